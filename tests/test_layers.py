"""The task-batched layer kernels' reference (fastmaml/layers/reference.py) against autograd.

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

from fastmaml.layers import reference as L

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
