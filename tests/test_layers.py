"""The task-batched layer kernels' reference (fastmaml/layers/torch_kernels.py) against autograd.

The oracle for every layer is PyTorch's own functional layers run one task at a time
(``F.conv2d``, ``F.batch_norm(training=True)``, ``F.leaky_relu``, ``F.max_pool2d``, ``F.linear``,
``F.cross_entropy``), differentiated by torch.func: ``vjp`` for the backward, ``jvp`` for the
R-forward, and ``jvp`` of the ``vjp`` (forward over reverse, i.e. autograd's second derivative) for
the R-backward. Nothing here shares code with the kernels it checks. float64, random non-uniform
inputs, odd sizes; whole-output relative error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from fastmaml.layers import torch_kernels as L

DT = torch.float64
TOL = 1e-11


def rel(a, b) -> float:
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def rnd(*shape, g):
    # non-uniform: a random scale per call and a shifted mean
    return (torch.randn(*shape, generator=g, dtype=DT) * (0.5 + torch.rand((), generator=g, dtype=DT))
            + 0.1 * torch.randn((), generator=g, dtype=DT))


def oracle_block(z, gamma, beta, eps, slope, pool):
    outs = []
    for t in range(z.shape[0]):
        zt = z[t] if z.dim() == 5 else z[t]
        a = F.batch_norm(zt, None, None, gamma[t], beta[t], training=True, eps=eps)
        h = a if slope == 1.0 else F.leaky_relu(a, slope)
        outs.append(F.max_pool2d(h, 2) if pool == 2 else h)
    return torch.stack(outs)


BLOCK_CASES = [
    # T, N, C, H, W, slope, pool
    (3, 5, 4, 7, 9, 0.0, 2),     # odd sides: the last row and column are dropped by the pool
    (2, 4, 3, 6, 6, 0.1, 2),     # LeakyReLU
    (2, 6, 5, 3, 5, 0.0, 0),     # no pool
    (3, 7, 6, 1, 1, 0.0, 0),     # BatchNorm1d after a Linear
    (2, 5, 3, 4, 4, 1.0, 0),     # BatchNorm alone
]


@pytest.mark.parametrize("T,N,C,H,W,slope,pool", BLOCK_CASES)
def test_bn_act_pool_all_four_passes(T, N, C, H, W, slope, pool):
    g = torch.Generator().manual_seed(T * 100 + C)
    eps = 1e-3
    z, rz = rnd(T, N, C, H, W, g=g), rnd(T, N, C, H, W, g=g)
    gamma, beta = 1 + rnd(T, C, g=g), rnd(T, C, g=g)
    ug, ub = rnd(T, C, g=g), rnd(T, C, g=g)
    f = lambda z_, g_, b_: oracle_block(z_, g_, b_, eps, slope, pool)  # noqa: E731

    out, mean, rstd, idx = L.bn_act_pool_forward(z, gamma, beta, eps, slope, pool)
    ref_out, pull = vjp(f, z, gamma, beta)
    assert rel([out], [ref_out]) < TOL

    dout, rdout = rnd(*out.shape, g=g), rnd(*out.shape, g=g)
    assert rel(L.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool), pull(dout)) < TOL

    rout, rmean, q = L.bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ug, ub, idx, slope, pool)
    _, ref_rout = jvp(f, (z, gamma, beta), (rz, ug, ub))
    assert rel([rout], [ref_rout]) < TOL

    def back(z_, g_, b_, d_):
        return vjp(f, z_, g_, b_)[1](d_)

    _, ref_r = jvp(back, (z, gamma, beta, dout), (rz, ug, ub, rdout))
    got = L.bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ug, idx, slope, pool)
    assert rel(got, ref_r) < TOL


def test_bn_act_pool_zero_directions():
    """None means an exact zero: R{z} = None and unmoved gamma/beta give the same as explicit zeros."""
    g = torch.Generator().manual_seed(7)
    z, gamma, beta = rnd(2, 5, 3, 6, 6, g=g), 1 + rnd(2, 3, g=g), rnd(2, 3, g=g)
    out, mean, rstd, idx = L.bn_act_pool_forward(z, gamma, beta, 1e-5, 0.0, 2)
    dout, rdout = rnd(*out.shape, g=g), rnd(*out.shape, g=g)
    zero_c = torch.zeros_like(gamma)
    a, rm_a, q_a = L.bn_act_pool_rforward(None, z, mean, rstd, gamma, beta, None, None, idx, 0.0, 2)
    b, rm_b, q_b = L.bn_act_pool_rforward(torch.zeros_like(z), z, mean, rstd, gamma, beta, zero_c, zero_c, idx, 0.0, 2)
    assert torch.equal(a, b)
    ra = L.bn_act_pool_rbackward(dout, rdout, z, None, mean, rstd, rm_a, q_a, gamma, beta, None, idx, 0.0, 2)
    rb = L.bn_act_pool_rbackward(dout, rdout, z, torch.zeros_like(z), mean, rstd, rm_b, q_b, gamma, beta, zero_c,
                                 idx, 0.0, 2)
    assert rel(ra, rb) < 1e-15


def oracle_conv(x, w, b, stride, padding):
    return torch.stack([F.conv2d(x[t], w[t], None if b is None else b[t], stride=stride, padding=padding)
                        for t in range(x.shape[0])])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin", [1, 3])
def test_conv2d_forward_backward(stride, cin):
    g = torch.Generator().manual_seed(stride * 10 + cin)
    T, N, O, H, W = 3, 4, 5, 9, 7
    x, w, b = rnd(T, N, cin, H, W, g=g), rnd(T, O, cin, 3, 3, g=g), rnd(T, O, g=g)
    y = L.conv2d_forward(x, w, b, stride, 1)
    ref_y, pull = vjp(lambda x_, w_, b_: oracle_conv(x_, w_, b_, stride, 1), x, w, b)
    assert rel([y], [ref_y]) < TOL
    dy = rnd(*y.shape, g=g)
    dx, dw, db = L.conv2d_backward(dy, x, w, stride, 1, True, True, True)
    assert rel([dx, dw, db], list(pull(dy))) < TOL
    only_dx = L.conv2d_backward(dy, x, w, stride, 1, True, False, False)
    assert only_dx[1] is None and only_dx[2] is None and rel([only_dx[0]], [dx]) < 1e-15


def test_linear_r_passes():
    g = torch.Generator().manual_seed(3)
    T, N, I, O = 3, 6, 5, 4
    x, rx, w, b, uw, ub = rnd(T, N, I, g=g), rnd(T, N, I, g=g), rnd(T, O, I, g=g), rnd(T, O, g=g), rnd(T, O, I, g=g), rnd(T, O, g=g)
    f = lambda x_, w_, b_: torch.stack([F.linear(x_[t], w_[t], b_[t]) for t in range(T)])  # noqa: E731
    y, pull = vjp(f, x, w, b)
    assert rel([L.linear_forward(x, w, b)], [y]) < TOL
    dy, rdy = rnd(*y.shape, g=g), rnd(*y.shape, g=g)
    dx, dw, db = L.linear_backward(dy, x, w, True, True)
    assert rel([dx, dw, db], list(pull(dy))) < TOL
    _, ry = jvp(f, (x, w, b), (rx, uw, ub))
    assert rel([L.linear_rforward(x, rx, w, uw, ub)], [ry]) < TOL
    _, rref = jvp(lambda x_, w_, b_, d_: vjp(f, x_, w_, b_)[1](d_), (x, w, b, dy), (rx, uw, ub, rdy))
    assert rel(list(L.linear_rbackward(dy, rdy, x, rx, w, uw, True, True)), list(rref)) < TOL


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_loss_r_backward(kind):
    g = torch.Generator().manual_seed(11)
    T, N, K = 3, 7, 5
    z, rz = rnd(T, N, K, g=g), rnd(T, N, K, g=g)
    scale = 0.37
    if kind == "ce":
        y = torch.randint(0, K, (T, N), generator=g)
        f = lambda z_: torch.stack([F.cross_entropy(z_[t], y[t]) for t in range(T)])  # noqa: E731
        losses, d, p = L.cross_entropy_forward_backward(z, y, scale)
        rd = L.cross_entropy_rbackward(p, rz, scale)
    else:
        y = rnd(T, N, K, g=g)
        f = lambda z_: torch.stack([F.mse_loss(z_[t], y[t]) for t in range(T)])  # noqa: E731
        losses, d = L.mse_forward_backward(z, y, scale)
        rd = L.mse_rbackward(z, rz, scale)
    ref, pull = vjp(f, z)
    seed = torch.full((T,), scale, dtype=DT)
    assert rel([losses], [ref]) < TOL
    assert rel([d], [pull(seed)[0]]) < TOL
    # R{d} = H rz by autograd's double backward (an independent second derivative)
    zl = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad((f(zl) * seed).sum(), zl, create_graph=True)
    (rref,) = torch.autograd.grad(gz, zl, grad_outputs=rz)
    assert rel([rd], [rref]) < TOL


# -- finite differences: each backend's explicit passes against its own forward ---------------------
# torch.autograd.gradcheck on an autograd.Function whose backward is the kernel's backward checks
# the backward against central differences of the forward; the R-passes are checked the same way
# (R{f}(x) = d/de f(x + e r), R{back}(x, d) = d/de back(x + e r, d + e rd)).

from fastmaml.layers import layer_kernels  # noqa: E402


def _backends():
    out = []
    for name in ("torch", "cpp", "triton"):
        try:
            out.append(pytest.param(layer_kernels(torch.device("cpu"), name), id=name))
        except RuntimeError as e:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=str(e))))
    return out


def _fd(f, x, r, eps=1e-6):
    """Central difference of f (a tuple-valued function of a tuple) along r."""
    plus = f(tuple(a + eps * b for a, b in zip(x, r)))
    minus = f(tuple(a - eps * b for a, b in zip(x, r)))
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


FD_TOL = 1e-7


@pytest.mark.parametrize("K", _backends())
@pytest.mark.parametrize("slope,pool", [(0.0, 2), (0.2, 0)])
def test_bn_act_pool_gradcheck_and_r_passes_by_finite_differences(K, slope, pool):
    g = torch.Generator().manual_seed(21)
    eps = 1e-3
    T, N, C, H, W = 2, 3, 2, 5, 4
    z, gamma, beta = rnd(T, N, C, H, W, g=g), 1 + rnd(T, C, g=g), rnd(T, C, g=g)

    class Block(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z_, g_, b_):
            out, mean, rstd, idx = K.bn_act_pool_forward(z_, g_, b_, eps, slope, pool)
            ctx.save_for_backward(z_, g_, b_, mean, rstd, idx if idx is not None else torch.empty(0))
            return out

        @staticmethod
        def backward(ctx, dout):
            z_, g_, b_, mean, rstd, idx = ctx.saved_tensors
            return K.bn_act_pool_backward(dout.contiguous(), z_, mean, rstd, g_, b_, idx if pool else None, slope, pool)

    # float64 gradcheck (finite differences of the kernel's own forward); keep inputs away from the
    # ReLU kink and pooling ties: random continuous inputs hit neither at this step size
    assert torch.autograd.gradcheck(Block.apply, (z.clone().requires_grad_(), gamma.clone().requires_grad_(),
                                                  beta.clone().requires_grad_()), eps=1e-6, atol=1e-7, fast_mode=True)

    out, mean, rstd, idx = K.bn_act_pool_forward(z, gamma, beta, eps, slope, pool)
    rz, ug, ub = rnd(T, N, C, H, W, g=g), rnd(T, C, g=g), rnd(T, C, g=g)
    dout, rdout = rnd(*out.shape, g=g), rnd(*out.shape, g=g)
    rout, rmean, q = K.bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ug, ub, idx, slope, pool)
    (fd_out,) = _fd(lambda a: (K.bn_act_pool_forward(a[0], a[1], a[2], eps, slope, pool)[0],),
                    (z, gamma, beta), (rz, ug, ub))
    assert rel([rout], [fd_out]) < FD_TOL

    def back(a):
        zz, gg, bb, dd = a
        _, m, s, i = K.bn_act_pool_forward(zz, gg, bb, eps, slope, pool)
        return K.bn_act_pool_backward(dd, zz, m, s, gg, bb, i, slope, pool)

    fd = _fd(back, (z, gamma, beta, dout), (rz, ug, ub, rdout))
    got = K.bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ug, idx, slope, pool)
    assert rel(got, fd) < FD_TOL


@pytest.mark.parametrize("K", _backends())
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_gradcheck(K, stride):
    g = torch.Generator().manual_seed(22 + stride)
    x, w, b = rnd(2, 3, 2, 6, 5, g=g), rnd(2, 3, 2, 3, 3, g=g), rnd(2, 3, g=g)

    class Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_, w_, b_):
            ctx.save_for_backward(x_, w_)
            return K.conv2d_forward(x_, w_, b_, stride, 1)

        @staticmethod
        def backward(ctx, dy):
            x_, w_ = ctx.saved_tensors
            return K.conv2d_backward(dy.contiguous(), x_, w_, stride, 1, True, True, True)

    assert torch.autograd.gradcheck(Conv.apply, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()),
                                    eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)])
def test_conv2d_backward_per_task_equals_grouped(need):
    """The per-task ATen backward (the CPU's choice for large per-task batches) computes what the
    grouped one does, and both match autograd per task."""
    g = torch.Generator().manual_seed(31)
    x, w = rnd(3, 17, 4, 7, 6, g=g), rnd(3, 5, 4, 3, 3, g=g)
    dy = rnd(3, 17, 5, 7, 6, g=g)
    a = L.conv2d_backward(dy, x, w, 1, 1, *need)
    b = L.conv2d_backward_per_task(dy, x, w, 1, 1, *need)
    _, pull = vjp(lambda x_, w_: oracle_conv(x_, w_, None, 1, 1), x, w)
    dx_ref, dw_ref = pull(dy)
    for got, want in zip(b, (dx_ref if need[0] else None, dw_ref if need[1] else None, dy.sum(dim=(1, 3, 4)) if need[2] else None)):
        assert (got is None) == (want is None)
        if got is not None:
            assert rel([got], [want]) < TOL
    for u, v in zip(a, b):
        assert (u is None) == (v is None) and (u is None or rel([u], [v]) < 1e-14)
