"""Linear layers, task-batched: every task its own weight.

    y[t] = x[t] @ w[t]^T + b[t]        x [T, N, I], w [T, O, I], b [T, O], y [T, N, O]

* forward:    y = x w^T + b                               (one batched matmul, bias fused: baddbmm)
* backward:   dL/dx = dy w,  dL/dw = dy^T x,  dL/db = sum_n dy
* R-forward:  R{y} = R{x} w^T + x u_w^T + u_b
* R-backward: R{dx} = R{dy} w + dy u_w,  R{dw} = R{dy}^T x + dy^T R{x},  R{db} = sum_n R{dy}

An input with more dimensions ([T, N, ..., I], as nn.Linear accepts) is run as rows [T, N * ..., I]
(:func:`.tensors.rows`). The Linear runs these torch functions on every backend (cuBLAS/oneDNN
batched matmuls are what a custom kernel would be). An adapted weight's gradient is written
straight into its view of the [T, P] result (``dw_out``: no temporary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .node import PassContext, Saved
from .tensors import Opt, add_opt, rows, unrows


def linear_forward(x: Tensor, w: Tensor, b: Opt) -> Tensor:
    """y [T, N, O]."""
    return torch.bmm(x, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))


def linear_backward(dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_bias: bool,
                    dw_out: Opt = None) -> Tuple[Opt, Tensor, Opt]:
    """(dx [T, N, I] or None, dw [T, O, I], db [T, O] or None). ``dw_out``: where to write dw (a
    [T, O, I] view with unit inner stride, e.g. a parameter's view of the [T, P] gradient)."""
    dx = torch.bmm(dy, w) if need_dx else None
    return dx, torch.bmm(dy.transpose(1, 2), x, out=dw_out), (dy.sum(1) if need_bias else None)


def linear_rforward(x: Tensor, rx: Opt, w: Tensor, uw: Opt, ub: Opt) -> Opt:
    """R{y} [T, N, O] = R{x} w^T + x u_w^T + u_b (None when every term is zero)."""
    ry = None if rx is None else torch.bmm(rx, w.transpose(1, 2))
    if uw is not None:
        ry = add_opt(ry, torch.bmm(x, uw.transpose(1, 2)))
    if ub is not None:
        ry = ub[:, None, :].expand(x.shape[0], x.shape[1], -1) if ry is None else ry + ub[:, None, :]
    return ry


def linear_rbackward(dy: Tensor, rdy: Opt, x: Tensor, rx: Opt, w: Tensor, uw: Opt, need_dx: bool,
                     need_bias: bool, dw_out: Opt = None) -> Tuple[Opt, Opt, Opt]:
    """R{dx} = R{dy} w + dy u_w, R{dw} = R{dy}^T x + dy^T R{x}, R{db} = sum R{dy}. ``dw_out``: where to
    write R{dw} (as in :func:`linear_backward`; zeroed when neither term exists)."""
    rdx = rdw = rdb = None
    if rdy is not None:
        rdx, rdw, rdb = linear_backward(rdy, x, w, need_dx, need_bias, dw_out=dw_out)
    if need_dx and uw is not None:
        rdx = add_opt(rdx, torch.bmm(dy, uw))
    if rx is not None:
        if rdw is None:
            rdw = torch.bmm(dy.transpose(1, 2), rx, out=dw_out)
        else:
            rdw = torch.baddbmm(rdw, dy.transpose(1, 2), rx, out=rdw)  # accumulated in place: one pass
    elif rdw is None and dw_out is not None:
        rdw = dw_out.zero_()
    return rdx, rdw, rdb


# -- runner node -------------------------------------------------------------------------------

@dataclass
class LinearSaved(Saved):
    shape: Optional[torch.Size] = None   # the input's shape [T, N, ..., I]
    x: Optional[Tensor] = None           # the input as rows [T, M, I]
    rx: Optional[Tensor] = None          # R{x} as rows (R-forward; None: zero)


@dataclass(frozen=True)
class Linear:
    weight: str
    bias: Optional[str]

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        shape = h.shape
        x = rows(h)
        b = ctx.params[self.bias] if self.bias else None
        y = unrows(linear_forward(x, ctx.params[self.weight], b), shape)
        return y, (LinearSaved(shape=shape, x=x) if save else None)

    def backward(self, ctx: PassContext, s: LinearSaved, d: Tensor, need_dx: bool) -> Optional[Tensor]:
        want_w, want_b = ctx.wants(self.weight), ctx.wants(self.bias)
        # an adapted weight's gradient is written straight into its view of g (no temporary)
        out = ctx.grad_view(self.weight)
        s.d = d = rows(d)
        dx, dw, db = linear_backward(d, s.x, ctx.params[self.weight], need_dx, want_b, dw_out=out)
        ctx.put(self.weight if want_w and out is None else None, dw)
        ctx.put(self.bias if want_b else None, db)
        return unrows(dx, s.shape)

    def rforward(self, ctx: PassContext, s: LinearSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        s.rx = r = rows(r)
        uw, ub = ctx.direction.get(self.weight), (ctx.direction.get(self.bias) if self.bias else None)
        r = linear_rforward(s.x, r, ctx.params[self.weight], uw, ub)
        return unrows(r, s.shape)

    def rbackward(self, ctx: PassContext, s: LinearSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        want_w, want_b = ctx.wants(self.weight), ctx.wants(self.bias)
        out = ctx.grad_view(self.weight)
        rd = rows(rd)
        rdx, rdw, rdb = linear_rbackward(s.d, rd, s.x, s.rx, ctx.params[self.weight],
                                         ctx.direction.get(self.weight), need_dx, want_b, dw_out=out)
        ctx.put(self.weight if want_w and out is None else None, rdw)
        ctx.put(self.bias if want_b else None, rdb)
        return unrows(rdx, s.shape)
