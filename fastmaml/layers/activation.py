"""Elementwise activations: ReLU (slope 0), LeakyReLU (its negative slope), none (slope 1).

    h = f(x) = x                 where x > 0
             = slope * x         elsewhere                      x, h [T, N, ...]

* forward:    h = x * f'(x), with f'(x) = 1 where x > 0, slope elsewhere
* backward:   dL/dx = f'(x) dL/dh
* R-forward:  R{h} = f'(x) R{x}
* R-backward: R{dL/dx} = f'(x) R{dL/dh} + f''(x) R{x} dL/dh = f'(x) R{dL/dh}   (f'' = 0 almost everywhere)

so one function (:func:`act_backward`, multiply by f'(x)) serves three passes. Inside a BatchNorm
block the activation is fused into the block's kernels (:mod:`.batchnorm`); the node here is a
standalone activation (:class:`Act`), run with these torch functions on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .node import PassContext, Saved


def act_slope(a: Tensor, slope: float) -> Tensor:
    """dh/da: 1 where a > 0, slope elsewhere."""
    one = torch.ones((), dtype=a.dtype, device=a.device)
    return torch.where(a > 0, one, one * slope)


def act_forward(x: Tensor, slope: float) -> Tensor:
    return x * act_slope(x, slope)


def act_backward(dy: Tensor, x: Tensor, slope: float) -> Tensor:
    """Also the R-rule of both directions: the activation's derivative is piecewise constant."""
    return dy * act_slope(x, slope)


@dataclass
class ActSaved(Saved):
    x: Optional[Tensor] = None   # the input [T, N, ...]


@dataclass(frozen=True)
class Act:
    """A standalone ReLU / LeakyReLU (one not fused into a BatchNorm block)."""

    slope: float

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        s = ActSaved(x=h) if save else None
        return act_forward(h, self.slope), s

    def backward(self, ctx: PassContext, s: ActSaved, d: Tensor, need_dx: bool) -> Tensor:
        return act_backward(d, s.x, self.slope)

    def rforward(self, ctx: PassContext, s: ActSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        return None if r is None else act_backward(r, s.x, self.slope)

    def rbackward(self, ctx: PassContext, s: ActSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        return None if rd is None else act_backward(rd, s.x, self.slope)
