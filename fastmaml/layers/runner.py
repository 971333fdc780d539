"""The fused path: a compiled model's forward, backward and Hessian-vector product for all T tasks.

For per-task weights ``theta`` [T, P] (the adapted parameters in the flat layout; the others are
shared by all tasks) and inputs x [T, N, ...], ``FusedModel`` computes with the task-batched layer
kernels of :mod:`fastmaml.layers` and no autograd:

* ``grad``: the per-task losses L_t, the per-task gradients dL_t/dtheta_t [T, P] and, when asked,
  the gradients of the shared parameters (summed over tasks); optionally the state the HVP needs.
* ``hvp``: for a direction u [T, P], ``H_t u_t = R{dL_t/dtheta_t}`` [T, P] and, for the shared
  parameters phi, ``sum_t R{dL_t/dphi}`` = d/dphi sum_t <grad_theta L_t, u_t> (engine.md section 2),
  by Pearlmutter's R-operator: one R-forward and one R-backward over the stored forward/backward.

The loss is the engine's default: cross-entropy (int64 labels [T, N]) or mean squared error (float
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
from ..step_context import weight_set
from . import reference as R
from .program import Act, BatchNormBlock, Conv, Flatten, GlobalMean, Linear, MaxPool, Node, params_of


@dataclass
class FusedState:
    """What the HVP needs from one forward and backward: per node, its inputs and its incoming
    gradient; and the loss's own second-order quantities."""

    theta: Tensor
    params: Dict[str, Tensor]
    saved: List[dict]
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


def _to5(t: Tensor) -> Tensor:
    """BatchNorm input [T, N, C] / [T, N, C, L] / [T, N, C, H, W] as [T, N, C, H, W]."""
    while t.dim() < 5:
        t = t.unsqueeze(-1)
    return t


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

    @staticmethod
    def _row(node: BatchNormBlock, step: Optional[int]) -> Optional[int]:
        """The weight set a per-step BatchNorm block uses at ``step``: min(step, S - 1); None for an
        ordinary block. The rule is :func:`fastmaml.step_context.weight_set`, shared with ``PerStepBatchNorm``."""
        if not node.steps:
            return None
        return weight_set(step, node.steps, "the fused path's per-step BatchNorm",
                          "pass step= (the engine passes fastmaml.step_context.current_step())")

    # -- forward ---------------------------------------------------------------------------------
    def _forward(self, params: Dict[str, Tensor], x: Tensor, save: bool,
                 step: Optional[int] = None) -> Tuple[Tensor, List[dict]]:
        K = self.kernels
        saved: List[dict] = []
        h = x
        for node in self.nodes:
            s: dict = {}
            if isinstance(node, Conv):
                s["x"] = h
                b = params[node.bias] if node.bias else None
                h = K.conv2d_forward(h, params[node.weight], b, node.stride, node.padding)
                s["yshape"] = h.shape
            elif isinstance(node, BatchNormBlock):
                z = _to5(h)
                gamma, beta = self._bn_affine(node, params, z, self._row(node, step))
                out, mean, rstd, idx = K.bn_act_pool_forward(z, gamma, beta, node.eps, node.slope, node.pool)
                s.update(z=z, shape=h.shape, mean=mean, rstd=rstd, idx=idx, gamma=gamma, beta=beta)
                h = out if node.pool else out.view(h.shape)
            elif isinstance(node, Act):
                s["x"] = h
                h = R.act_forward(h, node.slope)
            elif isinstance(node, MaxPool):
                s["shape"] = h.shape
                h, s["idx"] = R.maxpool_forward(h)
            elif isinstance(node, GlobalMean):
                s["shape"] = h.shape
                h = R.global_mean_forward(h)
                if node.keepdim:
                    h = h[..., None, None]
            elif isinstance(node, Flatten):
                s["shape"] = h.shape
                h = h.reshape(h.shape[0], h.shape[1], -1)
            elif isinstance(node, Linear):
                s["shape"] = h.shape
                s["x"] = h = _rows(h)
                b = params[node.bias] if node.bias else None
                h = R.linear_forward(h, params[node.weight], b)
                h = _unrows(h, s["shape"])
            saved.append(s if save else {})
        return h, saved

    @staticmethod
    def _bn_affine(node: BatchNormBlock, params: Dict[str, Tensor], z: Tensor,
                   row: Optional[int]) -> Tuple[Tensor, Tensor]:
        """gamma, beta [T, C] of a BatchNorm block (row ``row`` of [T, S, C] for per-step ones)."""
        if node.weight is None:
            T, C = z.shape[0], z.shape[2]
            return (torch.ones(T, C, dtype=z.dtype, device=z.device), torch.zeros(T, C, dtype=z.dtype, device=z.device))
        gamma, beta = params[node.weight], params[node.bias]
        if row is not None:
            gamma, beta = gamma[:, row], beta[:, row]
        return gamma.contiguous(), beta.contiguous()

    def forward(self, flat: Tensor, x: Tensor, step: Optional[int] = None) -> Tensor:
        """The outputs [T, N, ...] of every task's model (``flat`` [P] or [T, P]) at inner ``step``
        (read by per-step BatchNorm only)."""
        if flat.dim() == 1:
            flat = flat.expand(x.shape[0], -1)
        with torch.no_grad():
            return self._forward(self.params(flat), x, save=False, step=step)[0]

    # -- loss ------------------------------------------------------------------------------------
    @staticmethod
    def _loss(pred: Tensor, y: Tensor, scale: float) -> Tuple[str, Tensor, Tensor, Tensor]:
        """(kind, losses [T], dL/dpred, what the loss's R-rule needs)."""
        if y.is_floating_point():
            if y.shape != pred.shape:
                raise ValueError(f"regression targets must have the predictions' shape {list(pred.shape)}, "
                                 f"got {list(y.shape)}")
            losses, d = R.mse_forward_backward(pred, y, scale)
            return "mse", losses, d, pred
        if pred.dim() != 3 or y.shape != pred.shape[:2]:
            raise ValueError(f"class labels must be [T, N] = {list(pred.shape[:2])} for predictions "
                             f"{list(pred.shape)}, got {list(y.shape)}")
        losses, d, p = R.cross_entropy_forward_backward(pred, y, scale)
        return "ce", losses, d, p

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
        kind, losses, d, loss_saved = self._loss(pred, y, scale)
        g = torch.empty(T, self.layout.numel, dtype=theta.dtype, device=theta.device) if out is None else out
        gviews = self.layout.views(g)
        shared_grads: Dict[str, Tensor] = {}

        def put(name: Optional[str], value: Optional[Tensor], row: Optional[int] = None) -> None:
            self._put(name, value, gviews, shared_grads, shared, row)

        K = self.kernels
        for i in reversed(range(len(self.nodes))):
            node, s, need_dx = self.nodes[i], saved[i], self._need_dx[i]
            s["d"] = d
            if isinstance(node, Conv):
                w = params[node.weight]
                want_w, want_b = self._wants(node.weight, shared), self._wants(node.bias, shared)
                dx, dw, db = K.conv2d_backward(d, s["x"], w, node.stride, node.padding, need_dx, want_w, want_b)
                put(node.weight if want_w else None, dw)
                put(node.bias if want_b else None, db)
                d = dx
            elif isinstance(node, BatchNormBlock):
                dout = d if node.pool else _to5(d)
                dz, dgamma, dbeta = K.bn_act_pool_backward(dout, s["z"], s["mean"], s["rstd"], s["gamma"], s["beta"],
                                                           s["idx"], node.slope, node.pool)
                s["dout"] = dout
                # put decides per parameter: a frozen scale (requires_grad=False) may sit beside a learned shift
                row = self._row(node, step)
                put(node.weight, dgamma, row)
                put(node.bias, dbeta, row)
                d = dz.view(s["shape"])
            elif isinstance(node, Act):
                d = R.act_backward(d, s["x"], node.slope)
            elif isinstance(node, MaxPool):
                d = R.maxpool_scatter(d, s["idx"], s["shape"][-2], s["shape"][-1])
            elif isinstance(node, GlobalMean):
                d = R.global_mean_backward(d.reshape(s["shape"][:3]), s["shape"][-2], s["shape"][-1])
            elif isinstance(node, Flatten):
                d = d.reshape(s["shape"])
            elif isinstance(node, Linear):
                want_w, want_b = self._wants(node.weight, shared), self._wants(node.bias, shared)
                # an adapted weight's gradient is written straight into its view of g (no temporary)
                out = gviews[node.weight] if node.weight in self.adapted else None
                s["d"] = d = _rows(d)
                dx, dw, db = R.linear_backward(d, s["x"], params[node.weight], need_dx, want_b, dw_out=out)
                put(node.weight if want_w and out is None else None, dw)
                put(node.bias if want_b else None, db)
                d = _unrows(dx, s["shape"])
            if not need_dx:
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
        K = self.kernels
        params, saved = state.params, state.saved
        U = self._direction(u)

        # R-forward: r is R{h}; None is an exact zero (the input has none).
        r: Optional[Tensor] = None
        for node, s in zip(self.nodes, saved):
            if isinstance(node, Conv):
                s["rx"] = r
                uw, ub = U.get(node.weight), (U.get(node.bias) if node.bias else None)
                w = params[node.weight]
                # R{z} = conv(R{x}, w) + conv(x, u_w) + u_b; the bias direction rides in the
                # convolution's bias (no extra pass over the activation)
                if r is not None and uw is not None:
                    # conv(R{x}, w) + conv(x, u_w) as one convolution over the stacked input channels
                    rz = K.conv2d_forward(torch.cat([r, s["x"]], dim=2), torch.cat([w, uw], dim=2), ub,
                                          node.stride, node.padding)
                elif r is not None:
                    rz = K.conv2d_forward(r, w, ub, node.stride, node.padding)
                elif uw is not None:
                    rz = K.conv2d_forward(s["x"], uw, ub, node.stride, node.padding)
                else:
                    rz = None if ub is None else ub[:, None, :, None, None].expand(s["yshape"])
                r = rz
            elif isinstance(node, BatchNormBlock):
                rz = None if r is None else _to5(r).contiguous()
                ug = U.get(node.weight) if node.weight else None
                ub = U.get(node.bias) if node.bias else None
                row = self._row(node, state.step)
                if row is not None:  # per-step BatchNorm: the direction of the row this step used
                    ug = None if ug is None else ug[:, row]
                    ub = None if ub is None else ub[:, row]
                if rz is None and ug is None and ub is None:
                    s["rz"] = None
                    s["rmean"] = s["q"] = None
                    r = None
                    continue
                rout, rmean, q = K.bn_act_pool_rforward(rz, s["z"], s["mean"], s["rstd"], s["gamma"], s["beta"],
                                                        ug, ub, s["idx"], node.slope, node.pool)
                s.update(rz=rz, rmean=rmean, q=q)
                r = rout if node.pool else rout.view(s["shape"])
            elif isinstance(node, Act):
                r = None if r is None else R.act_backward(r, s["x"], node.slope)
            elif isinstance(node, MaxPool):
                r = None if r is None else R.maxpool_gather(r, s["idx"])
            elif isinstance(node, GlobalMean):
                if r is not None:
                    r = R.global_mean_forward(r)
                    if node.keepdim:
                        r = r[..., None, None]
            elif isinstance(node, Flatten):
                r = None if r is None else r.reshape(r.shape[0], r.shape[1], -1)
            elif isinstance(node, Linear):
                s["rx"] = r = _rows(r)
                uw, ub = U.get(node.weight), (U.get(node.bias) if node.bias else None)
                r = R.linear_rforward(s["x"], r, params[node.weight], uw, ub)
                r = _unrows(r, s["shape"])

        rd = (R.cross_entropy_rbackward(state.loss_saved, r, state.scale) if state.loss_kind == "ce"
              else R.mse_rbackward(state.loss_saved, r, state.scale))

        hv = torch.zeros_like(u) if out is None else out.zero_()
        hviews = self.layout.views(hv)
        shared_terms: Dict[str, Tensor] = {}

        def put(name: Optional[str], value: Optional[Tensor], row: Optional[int] = None) -> None:
            self._put(name, value, hviews, shared_terms, shared, row)

        for i in reversed(range(len(self.nodes))):
            node, s, need_dx = self.nodes[i], saved[i], self._need_dx[i]
            if isinstance(node, Conv):
                w, dy = params[node.weight], s["d"]
                uw = U.get(node.weight)
                want_w, want_b = self._wants(node.weight, shared), self._wants(node.bias, shared)
                rx, x = s["rx"], s["x"]
                rdx = rdw = rdb = None
                if rd is not None and need_dx and uw is not None:
                    # conv^T(R{dy}, w) + conv^T(dy, u_w): one transposed convolution over the stacked
                    # output channels
                    rdx = K.conv2d_backward(torch.cat([rd, dy], dim=2), x, torch.cat([w, uw], dim=1),
                                            node.stride, node.padding, True, False, False)[0]
                elif need_dx and (rd is not None or uw is not None):
                    src, wt = (rd, w) if rd is not None else (dy, uw)
                    rdx = K.conv2d_backward(src, x, wt, node.stride, node.padding, True, False, False)[0]
                if want_w and rd is not None and rx is not None:
                    # wgrad(x, R{dy}) + wgrad(R{x}, dy): one weight gradient over the stacked examples
                    rdw = K.conv2d_backward(torch.cat([rd, dy], dim=1), torch.cat([x, rx], dim=1), w,
                                            node.stride, node.padding, False, True, False)[1]
                elif want_w and (rd is not None or rx is not None):
                    src, inp = (rd, x) if rd is not None else (dy, rx)
                    rdw = K.conv2d_backward(src, inp, w, node.stride, node.padding, False, True, False)[1]
                if want_b and rd is not None:
                    rdb = rd.sum(dim=(1, 3, 4))
                put(node.weight if want_w else None, rdw)
                put(node.bias if want_b else None, rdb)
                rd = rdx
            elif isinstance(node, BatchNormBlock):
                ug = U.get(node.weight) if node.weight else None
                row = self._row(node, state.step)
                if row is not None and ug is not None:
                    ug = ug[:, row]
                if s["rmean"] is None:  # nothing moved up to here: R{z} = 0 and no direction
                    rmean = q = torch.zeros_like(s["mean"])
                else:
                    rmean, q = s["rmean"], s["q"]
                rdout = None if rd is None else (rd if node.pool else _to5(rd))
                rdz, rdgamma, rdbeta = K.bn_act_pool_rbackward(
                    s["dout"], rdout, s["z"], s["rz"], s["mean"], s["rstd"], rmean, q, s["gamma"], s["beta"], ug,
                    s["idx"], node.slope, node.pool)
                put(node.weight, rdgamma, row)
                put(node.bias, rdbeta, row)
                rd = rdz.view(s["shape"])
            elif isinstance(node, Act):
                rd = None if rd is None else R.act_backward(rd, s["x"], node.slope)
            elif isinstance(node, MaxPool):
                rd = None if rd is None else R.maxpool_scatter(rd, s["idx"], s["shape"][-2], s["shape"][-1])
            elif isinstance(node, GlobalMean):
                rd = None if rd is None else R.global_mean_backward(rd.reshape(s["shape"][:3]), s["shape"][-2],
                                                                     s["shape"][-1])
            elif isinstance(node, Flatten):
                rd = None if rd is None else rd.reshape(s["shape"])
            elif isinstance(node, Linear):
                want_w, want_b = self._wants(node.weight, shared), self._wants(node.bias, shared)
                out = hviews[node.weight] if node.weight in self.adapted else None
                rd = _rows(rd)
                rdx, rdw, rdb = R.linear_rbackward(s["d"], rd, s["x"], s["rx"], params[node.weight],
                                                   U.get(node.weight), need_dx, want_b, dw_out=out)
                put(node.weight if want_w and out is None else None, rdw)
                put(node.bias if want_b else None, rdb)
                rd = _unrows(rdx, s["shape"])
            if not need_dx:
                break
        return hv, shared_terms


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """A Linear's input [T, N, ..., F] as the [T, N * ..., F] rows the task-batched matmul takes
    (a Linear maps the last dimension only, as nn.Linear does on any input); a view when it can be."""
    return t if t is None or t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def _unrows(t: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    """A Linear's rows [T, M, F'] back to ``shape`` [T, N, ..., F] with F' in place of F."""
    return t if t is None or len(shape) == 3 else t.reshape(*shape[:-1], t.shape[-1])


def _nbytes(saved: List[dict]) -> int:
    seen, total = set(), 0
    for s in saved:
        for v in s.values():
            if isinstance(v, Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total
