"""The interface of a runner node: one layer (or fused block) of a compiled model, owning its four passes.

A compiled model is a list of nodes (:mod:`.program`); :class:`.runner.FusedModel` runs them in
order for the forward and the R-forward, in reverse for the backward and the R-backward. Each node
class (one per layer family module: :mod:`.conv`, :mod:`.batchnorm`, :mod:`.linear`,
:mod:`.activation`, :mod:`.pooling`) is a frozen dataclass of the layer's static configuration
(parameter names, stride, ...) with four methods:

* ``forward(ctx, h, save) -> (out, saved)``: ``saved`` is the node's own typed dataclass (the
  inputs its other passes need), or None when ``save`` is False;
* ``backward(ctx, saved, d, need_dx) -> dL/dx or None``: routes its parameters' gradients through
  ``ctx.put``; the runner has recorded the incoming gradient in ``saved.d`` (the HVP needs it);
* ``rforward(ctx, saved, r) -> R{out} or None``: Pearlmutter's R-operator of the forward along the
  direction ``ctx.direction``; records what the R-backward needs in ``saved``;
* ``rbackward(ctx, saved, rd, need_dx) -> R{dL/dx} or None``: routes R{dL/dw} through ``ctx.put``.

``None`` is an exact zero (see :mod:`.tensors`). ``need_dx`` is False for the first node whose
input needs no gradient (no parameter before it): the pass may skip dL/dx.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

from torch import Tensor


@dataclass
class PassContext:
    """What every node of one pass reads (parameters, kernels, inner step, direction) and where its
    parameter gradients go.

    ``params``: name -> [T, *shape] (adapted ones are views of theta); ``kernels``: the swappable
    layer kernels (:func:`fastmaml.layers.layer_kernels`); ``step``: the inner step (per-step
    BatchNorm's weight set); ``direction``: name -> [T, *shape] views of the HVP's direction u
    (adapted parameters only; R passes); ``wants(name)``: is that parameter's gradient needed;
    ``put(name, value, row)``: route a per-task gradient [T, *shape] (see ``FusedModel._put``);
    ``grad_view(name)``: an adapted parameter's view of the [T, P] result (kernels may write into it
    directly), None for the others."""

    params: Dict[str, Tensor]
    kernels: object
    step: Optional[int]
    wants: Callable[[Optional[str]], bool]
    put: Callable[..., None]
    grad_view: Callable[[str], Optional[Tensor]]
    direction: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Saved:
    """The base of every node's saved state: ``d``, the gradient dL/d(out) that reached the node in
    the backward (set by the runner; the R-backward reads it). Each node class extends this with the
    fields its own passes need."""

    d: Optional[Tensor] = None


def saved_tensors(saved: object) -> Iterable[Tensor]:
    """The tensors a node's saved state holds, in field order."""
    if saved is None:
        return ()
    return (v for v in (getattr(saved, f.name) for f in dataclasses.fields(saved)) if isinstance(v, Tensor))


def param_names(node: object) -> Tuple[str, ...]:
    """The parameter names a node reads (weight, then bias), without the absent ones."""
    return tuple(n for n in (getattr(node, "weight", None), getattr(node, "bias", None)) if n is not None)
