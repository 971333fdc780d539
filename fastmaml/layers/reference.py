"""Task-batched layer kernels in plain PyTorch: the named reference of every fused layer kernel.

Every tensor carries the task dimension first: activations are [T, N, ...] (T tasks, N examples
each), weights [T, ...] (each task its own fast weights). Every function computes, without
autograd, one of four passes of a layer (engine.md section 9):

* ``forward``:   y = f(x; w)
* ``backward``:  given dL/dy: dL/dx (when asked) and dL/dw, per task
* ``rforward``:  the R-operator of the forward: R{y} = (df/dx) R{x} + (df/dw) u_w
* ``rbackward``: the R-operator of the backward: R{dL/dx} and R{dL/dw}

so that the support loss's Hessian-vector product ``H u = R{dL/dw}`` comes from one forward, one
backward, one R-forward and one R-backward, with no autograd graph. ``None`` stands for an exact
zero (an input with no R-part, a weight the direction does not move).

The C++ (``csrc/layers.cpp``) and Triton (``fastmaml/triton/layers.py``) kernels implement the
same signatures and are tested against these functions; these in turn are tested against
autograd's double backward (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Opt = Optional[Tensor]


def _add(a: Opt, b: Opt) -> Opt:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# ---------------------------------------------------------------------------------------------
# Convolution: y[t] = conv2d(x[t], w[t]) + b[t]        x [T, N, C, H, W], w [T, O, C, kh, kw]
# Batched as one grouped convolution (groups = T): tasks never mix.
# ---------------------------------------------------------------------------------------------

def _grouped(x: Tensor) -> Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W]"""
    T, N, C, H, W = x.shape
    return x.transpose(0, 1).reshape(N, T * C, H, W)


def _ungrouped(y: Tensor, T: int) -> Tensor:
    """[N, T*O, H, W] -> [T, N, O, H, W]"""
    N, TO, H, W = y.shape
    return y.view(N, T, TO // T, H, W).transpose(0, 1).contiguous()


def conv2d_forward(x: Tensor, w: Tensor, b: Opt, stride: int, padding: int) -> Tensor:
    """y [T, N, O, Ho, Wo] = conv2d(x[t], w[t], b[t]) for every task t."""
    T = x.shape[0]
    y = F.conv2d(_grouped(x), w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                 stride=stride, padding=padding, groups=T)
    return _ungrouped(y, T)


def conv2d_backward(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool, need_dw: bool,
                    need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    """(dx [T, N, C, H, W], dw [T, O, C, kh, kw], db [T, O]) of conv2d_forward, each only when asked
    (else None): dx = conv^T(dy, w), dw = wgrad(x, dy), db = sum dy over (N, Ho, Wo). ``x`` only
    gives the shape when dw is not asked for, ``w`` when dx is not."""
    T = x.shape[0]
    dx = dw = None
    if need_dx or need_dw:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            _grouped(dy), _grouped(x), w.reshape(-1, *w.shape[2:]), None, [stride, stride], [padding, padding],
            [1, 1], False, [0, 0], T, [need_dx, need_dw, False])
        dx = _ungrouped(dx, T) if need_dx else None
        dw = dw.view_as(w) if need_dw else None
    db = dy.sum(dim=(1, 3, 4)) if need_bias else None
    return dx, dw, db


def conv2d_backward_per_task(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool,
                             need_dw: bool, need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    """conv2d_backward as one ATen convolution backward per task (same results: each task is one
    group of the grouped convolution); on the CPU faster than the grouped call for large
    per-task batches (bench/bench_layers.py)."""
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    if need_dx or need_dw:
        for t in range(x.shape[0]):
            a, b, _ = torch.ops.aten.convolution_backward(
                dy[t], x[t], w[t], None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
                [need_dx, need_dw, False])
            if need_dx:
                dx[t] = a
            if need_dw:
                dw[t] = b
    db = dy.sum(dim=(1, 3, 4)) if need_bias else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Linear: y[t] = x[t] @ w[t]^T + b[t]                  x [T, N, I], w [T, O, I]
# ---------------------------------------------------------------------------------------------

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
    ry = None if rx is None else torch.bmm(rx, w.transpose(1, 2))
    if uw is not None:
        ry = _add(ry, torch.bmm(x, uw.transpose(1, 2)))
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
        rdx = _add(rdx, torch.bmm(dy, uw))
    if rx is not None:
        if rdw is None:
            rdw = torch.bmm(dy.transpose(1, 2), rx, out=dw_out)
        else:
            rdw = torch.baddbmm(rdw, dy.transpose(1, 2), rx, out=rdw)  # accumulated in place: one pass
    elif rdw is None and dw_out is not None:
        rdw = dw_out.zero_()
    return rdx, rdw, rdb


# ---------------------------------------------------------------------------------------------
# BatchNorm (per-task batch statistics) + activation + 2x2 max-pool, fused.
#
#   z [T, N, C, H, W] (BatchNorm1d: H = W = 1); statistics per (t, c) over (N, H, W), M elements:
#   m = mean z, s = sqrt(var z + eps) (biased var), rstd = 1 / s, xh = (z - m) rstd
#   a = gamma xh + beta,  h = a if a > 0 else slope a,  out = maxpool2x2(h)  (or h when pool = 0)
#
# ``slope``: 0 for ReLU, the negative slope for LeakyReLU, 1 for no activation.
# ``pool``: 0 (none) or 2 (kernel 2, stride 2, no padding, floor: an odd last row/column is dropped).
# ``idx`` (uint8, out's shape): the position 0..3 (row-major) of each window's maximum, first on ties
# as torch's max_pool2d picks it.
# gamma, beta [T, C] (a shared parameter is passed expanded). BatchNorm without affine parameters:
# gamma = 1, beta = 0 and no gradients asked for.
# ---------------------------------------------------------------------------------------------

def _stats_view(t: Tensor) -> Tensor:
    return t[:, None, :, None, None]


def _act_slope(a: Tensor, slope: float) -> Tensor:
    """dh/da: 1 where a > 0, slope elsewhere."""
    one = torch.ones((), dtype=a.dtype, device=a.device)
    return torch.where(a > 0, one, one * slope)


def _pool_fwd(h: Tensor, pool: int) -> Tuple[Tensor, Opt]:
    if pool == 0:
        return h, None
    T, N, C, H, W = h.shape
    Ho, Wo = H // 2, W // 2
    win = h[:, :, :, :2 * Ho, :2 * Wo].reshape(T, N, C, Ho, 2, Wo, 2).permute(0, 1, 2, 3, 5, 4, 6)
    win = win.reshape(T, N, C, Ho, Wo, 4)
    out, idx = win.max(dim=-1)
    return out, idx.to(torch.uint8)


def _pool_gather(r: Tensor, idx: Opt, pool: int) -> Tensor:
    if pool == 0:
        return r
    T, N, C, H, W = r.shape
    Ho, Wo = H // 2, W // 2
    win = r[:, :, :, :2 * Ho, :2 * Wo].reshape(T, N, C, Ho, 2, Wo, 2).permute(0, 1, 2, 3, 5, 4, 6)
    win = win.reshape(T, N, C, Ho, Wo, 4)
    return win.gather(-1, idx.long()[..., None])[..., 0]


def _pool_scatter(d: Tensor, idx: Opt, pool: int, H: int, W: int) -> Tensor:
    if pool == 0:
        return d
    T, N, C, Ho, Wo = d.shape
    win = torch.zeros(T, N, C, Ho, Wo, 4, dtype=d.dtype, device=d.device)
    win.scatter_(-1, idx.long()[..., None], d[..., None])
    full = win.view(T, N, C, Ho, Wo, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(T, N, C, 2 * Ho, 2 * Wo)
    if (2 * Ho, 2 * Wo) != (H, W):
        full = F.pad(full, (0, W - 2 * Wo, 0, H - 2 * Ho))
    return full


def _xh(z: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return (z - _stats_view(mean)) * _stats_view(rstd)


def bn_act_pool_forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float,
                        pool: int) -> Tuple[Tensor, Tensor, Tensor, Opt]:
    """(out, mean [T, C], rstd [T, C], idx or None)."""
    mean = z.mean(dim=(1, 3, 4))
    var = (z - _stats_view(mean)).pow(2).mean(dim=(1, 3, 4))
    rstd = (var + eps).rsqrt()
    a = _stats_view(gamma) * _xh(z, mean, rstd) + _stats_view(beta)
    h = a * _act_slope(a, slope)
    out, idx = _pool_fwd(h, pool)
    return out, mean, rstd, idx


def _da(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt, slope: float,
        pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dL/da, xh, dh/da)."""
    xh = _xh(z, mean, rstd)
    act = _act_slope(_stats_view(gamma) * xh + _stats_view(beta), slope)
    dh = _pool_scatter(dout, idx, pool, z.shape[3], z.shape[4])
    return dh * act, xh, act


def _bn_dz(da: Tensor, xh: Tensor, rstd: Tensor, gamma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta) from dL/da: dxh = gamma da, dz = rstd (dxh - mean dxh - xh mean(dxh xh))."""
    dgamma = (da * xh).sum(dim=(1, 3, 4))
    dbeta = da.sum(dim=(1, 3, 4))
    M = da.numel() // (da.shape[0] * da.shape[2])
    dxh = da * _stats_view(gamma)
    dz = _stats_view(rstd) * (dxh - _stats_view(gamma * dbeta / M) - xh * _stats_view(gamma * dgamma / M))
    return dz, dgamma, dbeta


def bn_act_pool_backward(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt,
                         slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dz [T, N, C, H, W], dgamma [T, C], dbeta [T, C])."""
    da, xh, _ = _da(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    return _bn_dz(da, xh, rstd, gamma)


def bn_act_pool_rforward(rz: Opt, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt,
                         ubeta: Opt, idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{out}, rmean [T, C], q [T, C]):  R{m} = mean R{z}, q = mean(xh R{z}) (so R{s} = q),
    R{xh} = (R{z} - R{m} - xh q) rstd, R{a} = gamma R{xh} + u_gamma xh + u_beta, R{h} = (dh/da) R{a}."""
    xh = _xh(z, mean, rstd)
    a = _stats_view(gamma) * xh + _stats_view(beta)
    if rz is None:
        rz = torch.zeros_like(z)
    rmean = rz.mean(dim=(1, 3, 4))
    q = (xh * rz).mean(dim=(1, 3, 4))
    rxh = (rz - _stats_view(rmean) - xh * _stats_view(q)) * _stats_view(rstd)
    ra = _stats_view(gamma) * rxh
    if ugamma is not None:
        ra = ra + _stats_view(ugamma) * xh
    if ubeta is not None:
        ra = ra + _stats_view(ubeta)
    rh = ra * _act_slope(a, slope)
    return _pool_gather(rh, idx, pool), rmean, q


def bn_act_pool_rbackward(dout: Tensor, rdout: Opt, z: Tensor, rz: Opt, mean: Tensor, rstd: Tensor, rmean: Tensor,
                          q: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt, idx: Opt, slope: float,
                          pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{dz}, R{dgamma}, R{dbeta}). With dxh = gamma da and mu1 = mean dxh, mu2 = mean(dxh xh):
    R{dz} = -q rstd dz + rstd (R{dxh} - mean R{dxh} - R{xh} mu2 - xh mean(R{dxh} xh + dxh R{xh})),
    R{dxh} = gamma R{da} + u_gamma da, R{dgamma} = sum(R{da} xh + da R{xh}), R{dbeta} = sum R{da}."""
    da, xh, act = _da(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    dz, _, _ = _bn_dz(da, xh, rstd, gamma)
    if rz is None:
        rz = torch.zeros_like(z)
    rxh = (rz - _stats_view(rmean) - xh * _stats_view(q)) * _stats_view(rstd)
    rda = torch.zeros_like(da) if rdout is None else _pool_scatter(rdout, idx, pool, z.shape[3], z.shape[4]) * act
    g = _stats_view(gamma)
    dxh = g * da
    rdxh = g * rda if ugamma is None else g * rda + _stats_view(ugamma) * da
    dims = (1, 3, 4)
    mu2 = (dxh * xh).mean(dim=dims, keepdim=True)
    rdz = -_stats_view(q * rstd) * dz + _stats_view(rstd) * (
        rdxh - rdxh.mean(dim=dims, keepdim=True) - rxh * mu2 - xh * (rdxh * xh + dxh * rxh).mean(dim=dims, keepdim=True))
    rdgamma = (rda * xh + da * rxh).sum(dim=dims)
    rdbeta = rda.sum(dim=dims)
    return rdz, rdgamma, rdbeta


# ---------------------------------------------------------------------------------------------
# Standalone elementwise and pooling layers (outside a BatchNorm block), and the global mean.
# ---------------------------------------------------------------------------------------------

def act_forward(x: Tensor, slope: float) -> Tensor:
    return x * _act_slope(x, slope)


def act_backward(dy: Tensor, x: Tensor, slope: float) -> Tensor:
    """Also the R-rule of both directions: the activation's derivative is piecewise constant."""
    return dy * _act_slope(x, slope)


def maxpool_forward(x: Tensor) -> Tuple[Tensor, Tensor]:
    return _pool_fwd(x, 2)


def maxpool_gather(r: Tensor, idx: Tensor) -> Tensor:
    """R-forward of the max-pool (and nothing else): r at each window's maximum."""
    return _pool_gather(r, idx, 2)


def maxpool_scatter(d: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    """Backward (and R-backward) of the max-pool."""
    return _pool_scatter(d, idx, 2, H, W)


def global_mean_forward(x: Tensor) -> Tensor:
    """[T, N, C, H, W] -> [T, N, C]."""
    return x.mean(dim=(3, 4))


def global_mean_backward(dy: Tensor, H: int, W: int) -> Tensor:
    return (dy / (H * W))[..., None, None].expand(*dy.shape, H, W)


# ---------------------------------------------------------------------------------------------
# Losses, per task: L_t = mean_n l(pred[t, n], y[t, n]); seeded with dL/dL_t = scale.
# ---------------------------------------------------------------------------------------------

def cross_entropy_forward_backward(logits: Tensor, y: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(losses [T], dlogits [T, N, K] = scale (p - onehot) / N, p)."""
    T, N, K = logits.shape
    logp = torch.log_softmax(logits, dim=-1)
    losses = -logp.gather(-1, y[..., None])[..., 0].mean(1)
    p = logp.exp()
    d = p.clone()
    d.scatter_add_(-1, y[..., None], -torch.ones_like(d[..., :1]))
    return losses, d * (scale / N), p


def cross_entropy_rbackward(p: Tensor, rlogits: Opt, scale: float) -> Opt:
    """R{dlogits} = scale (diag p - p p^T) R{logits} / N."""
    if rlogits is None:
        return None
    N = p.shape[1]
    pr = p * rlogits
    return (pr - p * pr.sum(-1, keepdim=True)) * (scale / N)


def mse_forward_backward(pred: Tensor, y: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(losses [T] = mean over each task's elements of (pred - y)^2, dpred = 2 scale (pred - y) / M)."""
    diff = pred - y
    M = diff[0].numel()
    return diff.pow(2).flatten(1).mean(1), diff * (2.0 * scale / M)


def mse_rbackward(pred: Tensor, rpred: Opt, scale: float) -> Opt:
    if rpred is None:
        return None
    return rpred * (2.0 * scale / pred[0].numel())
