"""The fused path: a compiled model's forward, backward and Hessian-vector product for all T tasks.

For per-task weights ``theta`` [T, P] (the adapted parameters in the flat layout; the others are
shared by all tasks) and inputs x [T, N, ...], ``FusedModel`` computes with the task-batched layer
kernels of :mod:`fastmaml.layers` and no autograd:

* ``grad``: the per-task losses L_t, the per-task gradients dL_t/dtheta_t [T, P] and, when asked,
  the gradients of the shared parameters (summed over tasks); optionally the state the HVP needs.
* ``hvp``: for a direction u [T, P], ``H_t u_t = R{dL_t/dtheta_t}`` [T, P] and, for the shared
  parameters phi, ``sum_t R{dL_t/dphi}`` = d/dphi sum_t <grad_theta L_t, u_t> (docs/design.md §2),
  by Pearlmutter's R-operator: one R-forward and one R-backward over the stored forward/backward.

Each node owns its four passes (:mod:`.node`); this module only runs the list of nodes and routes
the parameter gradients. The loss is the engine's default (:mod:`.loss`): cross-entropy (int64 labels [T, N]) or mean squared error (float
targets shaped like the predictions), each a mean over one task's examples, seeded with ``scale``.

Per-step BatchNorm (MAML++'s BNWB, :class:`fastmaml.models.PerStepBatchNorm`, a ``BatchNormBlock``
with ``steps = S``): ``forward`` and ``grad`` take the inner ``step`` (see
:mod:`fastmaml.step_context`), and the block's gamma, beta are row s = min(step, S - 1) of its
[S, C] weight and bias ([T, S, C] in ``params``: the adapted columns of theta, or the shared tensor
expanded over tasks). The block's gradients and HVP terms land in row s only: for an adapted
per-step parameter the other rows of its [T, P] columns are zero, for a shared one the [S, C] result
is zero outside row s. ``FusedState`` remembers the step for the HVP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layout import FlatLayout
from .loss import builtin_loss, loss_rbackward
from .node import PassContext, saved_tensors
from .program import Node, params_of


@dataclass
class FusedState:
    """What the HVP needs from one forward and backward: per node, its saved state (its own
    dataclass: inputs, incoming gradient); and the loss's own second-order quantities."""

    theta: Tensor
    params: Dict[str, Tensor]
    saved: List[object]
    loss_kind: str
    loss_saved: Tensor   # softmax probabilities (CE) or predictions (MSE)
    scale: float
    nbytes: int = 0
    step: Optional[int] = None   # the inner step of the forward (per-step BatchNorm rows)


@dataclass
class GradResult:
    losses: Tensor                  # [T]
    grad: Tensor                    # [T, P]
    shared: Dict[str, Tensor]       # name -> gradient summed over tasks (when asked)
    pred: Tensor                    # [T, N, ...]
    state: Optional[FusedState] = None
    extra: dict = field(default_factory=dict)


class FusedModel:
    """Runs a compiled model (``nodes``) for all tasks with per-task adapted weights."""

    def __init__(self, model: nn.Module, layout: FlatLayout, nodes: List[Node], kernels) -> None:
        self.model = model
        self.layout = layout
        self.nodes = nodes
        self.kernels = kernels
        self.adapted = set(layout.names)
        # a node needs dL/dx when some node before it has a parameter with a gradient
        self._need_dx = []
        seen = False
        for node in nodes:
            self._need_dx.append(seen)
            seen = seen or bool(params_of(node))

    # -- parameters ------------------------------------------------------------------------------
    def params(self, theta: Tensor) -> Dict[str, Tensor]:
        """name -> [T, *shape]: views of ``theta`` for adapted parameters, the model's own tensor
        (expanded over tasks) for the others."""
        T = theta.shape[0]
        out = dict(self.layout.views(theta))
        for name, p in self.model.named_parameters():
            if name not in out:
                out[name] = p.detach().expand(T, *p.shape)
        return out

    def _direction(self, u: Tensor) -> Dict[str, Tensor]:
        return dict(self.layout.views(u))

    def _wants(self, name: Optional[str], shared: bool) -> bool:
        """Is the gradient of parameter ``name`` needed: adapted ones always, shared trainable
        ones when ``shared``."""
        if name is None:
            return False
        if name in self.adapted:
            return True
        return shared and self._trainable(name)

    def forget_trainable(self) -> None:
        """Some parameter's ``requires_grad`` changed: :meth:`_trainable` reads them again."""
        self.__dict__.pop("_trainable_names", None)

    def _trainable(self, name: str) -> bool:
        if not hasattr(self, "_trainable_names"):
            self._trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return name in self._trainable_names

    def _put(self, name: Optional[str], value: Optional[Tensor], views: Dict[str, Tensor],
             shared_out: Dict[str, Tensor], shared: bool, row: Optional[int] = None) -> None:
        """Route a per-task parameter gradient [T, *shape]: an adapted parameter's into its view of
        the [T, P] result, a shared trainable one's (when ``shared``) summed over tasks; any other
        (frozen, or shared when not ``shared``) is dropped: the same rule as :meth:`_wants`.

        ``row`` (per-step BatchNorm): ``value`` [T, C] is the gradient of row ``row`` of an [S, C]
        parameter; the other rows' gradient is zero (written as such: the [T, P] result may be
        uninitialized memory)."""
        if name is None or value is None:
            return
        if name in self.adapted:
            if row is None:
                views[name].copy_(value)
            else:
                view = views[name]
                view.zero_()
                view[:, row].copy_(value)
        elif shared and self._trainable(name):
            if row is None:
                shared_out[name] = value.sum(0)
            else:
                out = value.new_zeros((self._sets(name), value.shape[-1]))
                out[row] = value.sum(0)
                shared_out[name] = out

    def _sets(self, name: str) -> int:
        """S, the rows of the [S, C] per-step parameter ``name``."""
        return self.model.get_parameter(name).shape[0]

    def _context(self, params: Dict[str, Tensor], step: Optional[int], shared: bool,
                 views: Optional[Dict[str, Tensor]] = None, shared_out: Optional[Dict[str, Tensor]] = None,
                 direction: Optional[Dict[str, Tensor]] = None) -> PassContext:
        """The context of one pass: gradients routed into ``views`` (an adapted parameter's view of
        the [T, P] result) and ``shared_out`` (shared trainable ones, when ``shared``)."""
        views = {} if views is None else views

        def put(name: Optional[str], value: Optional[Tensor], row: Optional[int] = None) -> None:
            self._put(name, value, views, shared_out, shared, row)

        def grad_view(name: str) -> Optional[Tensor]:
            return views[name] if name in self.adapted else None

        return PassContext(params=params, kernels=self.kernels, step=step,
                           wants=lambda name: self._wants(name, shared), put=put, grad_view=grad_view,
                           direction={} if direction is None else direction)

    # -- forward ---------------------------------------------------------------------------------
    def _forward(self, params: Dict[str, Tensor], x: Tensor, save: bool,
                 step: Optional[int] = None) -> Tuple[Tensor, List[object]]:
        """The outputs and, when ``save``, each node's saved state (None per node otherwise)."""
        ctx = self._context(params, step, shared=False)
        saved: List[object] = []
        h = x
        for node in self.nodes:
            h, s = node.forward(ctx, h, save)
            saved.append(s)
        return h, saved

    def forward(self, flat: Tensor, x: Tensor, step: Optional[int] = None) -> Tensor:
        """The outputs [T, N, ...] of every task's model (``flat`` [P] or [T, P]) at inner ``step``
        (read by per-step BatchNorm only)."""
        if flat.dim() == 1:
            flat = flat.expand(x.shape[0], -1)
        with torch.no_grad():
            return self._forward(self.params(flat), x, save=False, step=step)[0]

    # -- backward --------------------------------------------------------------------------------
    def grad(self, theta: Tensor, x: Tensor, y: Tensor, scale: float = 1.0, shared: bool = False,
             keep: bool = False, step: Optional[int] = None, out: Optional[Tensor] = None) -> GradResult:
        """Forward and backward for all tasks; ``scale`` seeds dL_t (the engine's w_k / T); ``step``:
        the inner step (per-step BatchNorm's weight set; kept in the state for the HVP); ``out``: a
        [T, P] buffer for the gradient (every adapted parameter's view is written)."""
        T = x.shape[0]
        if theta.dim() == 1:
            theta = theta.expand(T, -1)
        params = self.params(theta)
        pred, saved = self._forward(params, x, save=True, step=step)
        kind, losses, d, loss_saved = builtin_loss(pred, y, scale)
        g = torch.empty(T, self.layout.numel, dtype=theta.dtype, device=theta.device) if out is None else out
        shared_grads: Dict[str, Tensor] = {}
        ctx = self._context(params, step, shared, self.layout.views(g), shared_grads)
        for i in reversed(range(len(self.nodes))):
            s = saved[i]
            s.d = d  # the incoming gradient, for the R-backward
            d = self.nodes[i].backward(ctx, s, d, self._need_dx[i])
            if not self._need_dx[i]:
                break
        state = None
        if keep:
            state = FusedState(theta, params, saved, kind, loss_saved, scale, step=step)
            state.nbytes = _nbytes(saved)
        return GradResult(losses, g, shared_grads, pred, state)

    # -- Hessian-vector product ------------------------------------------------------------------
    def hvp(self, state: FusedState, u: Tensor, shared: bool = True,
            out: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(H u [T, P], name -> sum over tasks of R{dL_t/dphi} for the shared trainable parameters).
        ``out``: a [T, P] buffer to write H u into (reused across the reverse pass's steps)."""
        saved, U = state.saved, self._direction(u)

        # R-forward: r is R{h}; None is an exact zero (the input has none).
        ctx = self._context(state.params, state.step, shared, direction=U)
        r: Optional[Tensor] = None
        for node, s in zip(self.nodes, saved):
            r = node.rforward(ctx, s, r)

        rd = loss_rbackward(state.loss_kind, state.loss_saved, r, state.scale)

        hv = torch.zeros_like(u) if out is None else out.zero_()
        shared_terms: Dict[str, Tensor] = {}
        ctx = self._context(state.params, state.step, shared, self.layout.views(hv), shared_terms, direction=U)

        for i in reversed(range(len(self.nodes))):
            rd = self.nodes[i].rbackward(ctx, saved[i], rd, self._need_dx[i])
            if not self._need_dx[i]:
                break
        return hv, shared_terms


def _nbytes(saved: List[object]) -> int:
    seen, total = set(), 0
    for s in saved:
        for v in saved_tensors(s):
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total
