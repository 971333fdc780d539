"""The C++ CPU layer kernels (csrc/cpu/conv.cpp, csrc/cpu/batchnorm.cpp via fastmaml.layers.cpp) against their
reference, fastmaml/layers/torch_kernels.py (itself checked against autograd in tests/test_layers.py).

float64: whole-output relative error <= 1e-12 (every output of a call together).
float32: whole-output relative error <= F32_TOL = 2e-6 against the float32 reference (measured:
about 1e-7; the kernels accumulate reductions in double, the reference in float32), and the
max-pool indices equal to the reference's on all but a vanishing fraction of windows (a near-tie
can flip when the statistics differ in the last bit).
Random non-uniform inputs, odd sizes and one realistic conv4 size; every option combination; the
BatchNorm kernels bit-identical at 1 and 2 threads and between their two builds (baseline and
AVX-512, FASTMAML_CPU_ISA=base), on sizes that leave vector tails; torch.library.opcheck on each op.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastmaml.layers import cpp as C
from fastmaml.layers import torch_kernels as R

pytestmark = pytest.mark.skipif(not C.AVAILABLE, reason=f"C++ layer kernels unavailable: {C.REASON}")

F64_TOL = 1e-12
F32_TOL = 2e-6
EPS = 1e-3


def rel(a, b) -> float:
    a = [t for t in a if t is not None]
    b = [t for t in b if t is not None]
    assert len(a) == len(b)
    a = torch.cat([t.reshape(-1).double() for t in a])
    b = torch.cat([t.reshape(-1).double() for t in b])
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def same_nones(a, b):
    assert [t is None for t in a] == [t is None for t in b]


def make_rnd(seed, dtype):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        # non-uniform: a random scale per call and a shifted mean
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand((), generator=g, dtype=torch.float64))
             + 0.3 * torch.randn((), generator=g, dtype=torch.float64))
        return t.to(dtype)

    return rnd


def tol(dtype):
    return F64_TOL if dtype == torch.float64 else F32_TOL


DTYPES = [torch.float64, torch.float32]

# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

CONV_CASES = [
    # T, N, C, O, H, W, k, stride, padding, bias
    (3, 5, 1, 4, 9, 11, 3, 1, 1, True),
    (3, 5, 1, 4, 9, 11, 3, 2, 1, False),
    (3, 5, 3, 7, 9, 11, 3, 1, 1, False),
    (3, 5, 3, 7, 9, 11, 3, 2, 1, True),
    (2, 3, 3, 5, 7, 6, 3, 1, 0, True),
    (4, 10, 64, 64, 14, 14, 3, 1, 1, True),  # conv4's inner layers
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("T,N,Cin,O,H,W,k,stride,padding,bias", CONV_CASES)
def test_conv2d(T, N, Cin, O, H, W, k, stride, padding, bias, dtype):
    rnd = make_rnd(T * 1000 + Cin * 10 + stride, dtype)
    x, w = rnd(T, N, Cin, H, W), rnd(T, O, Cin, k, k)
    b = rnd(T, O) if bias else None
    y = C.conv2d_forward(x, w, b, stride, padding)
    ref = R.conv2d_forward(x, w, b, stride, padding)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel([y], [ref]) <= tol(dtype)

    dy = rnd(*ref.shape)
    for need_dx, need_dw, need_bias in itertools.product([False, True], repeat=3):
        got = C.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        exp = R.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        same_nones(got, exp)
        if any(t is not None for t in exp):
            for g_, e_ in zip(got, exp):
                if e_ is not None:
                    assert g_.shape == e_.shape and g_.dtype == e_.dtype
            assert rel(got, exp) <= tol(dtype), (need_dx, need_dw, need_bias)


def test_conv2d_backward_shape_only_inputs():
    # x only gives the shape when dw is not asked for, w when dx is not: they may be expanded.
    rnd = make_rnd(7, torch.float64)
    x, w = rnd(3, 5, 3, 9, 11), rnd(3, 7, 3, 3, 3)
    dy = rnd(3, 5, 7, 9, 11)
    x_shape = torch.zeros((), dtype=x.dtype).expand(x.shape)
    w_shape = torch.zeros((), dtype=w.dtype).expand(w.shape)
    dx, dw, db = C.conv2d_backward(dy, x_shape, w, 1, 1, True, False, True)
    assert dw is None
    assert rel([dx, db], R.conv2d_backward(dy, x, w, 1, 1, True, False, True)[::2]) <= F64_TOL
    dx, dw, db = C.conv2d_backward(dy, x, w_shape, 1, 1, False, True, False)
    assert dx is None and db is None
    assert rel([dw], [R.conv2d_backward(dy, x, w, 1, 1, False, True, False)[1]]) <= F64_TOL


def test_conv2d_after_thread_count_change():
    # Regression: oneDNN's weight gradient, run per task from two threads, returned garbage for a
    # task right after torch.set_num_threads(1) -> (2); the kernels now compute it with a GEMM.
    if torch.get_num_threads() < 2 and torch.get_num_interop_threads() < 2:
        pytest.skip("needs 2 threads")
    old = torch.get_num_threads()
    rnd = make_rnd(11, torch.float32)
    x, w, dy = rnd(4, 6, 16, 13, 13), rnd(4, 16, 16, 3, 3), rnd(4, 6, 16, 13, 13)
    try:
        torch.set_num_threads(1)
        torch.randn(100000).add_(1).sum()
        torch.set_num_threads(2)
        got = C.conv2d_backward(dy, x, w, 1, 1, True, True, True)
    finally:
        torch.set_num_threads(old)
    exp = R.conv2d_backward(dy.double(), x.double(), w.double(), 1, 1, True, True, True)
    for t in range(4):
        assert rel([g[t] for g in got], [e[t] for e in exp]) <= 1e-5, t


# ---------------------------------------------------------------------------------------------
# BatchNorm + activation + max-pool
# ---------------------------------------------------------------------------------------------

BLOCK_CASES = [
    # T, N, C, H, W, slope, pool
    (3, 5, 7, 9, 11, 0.0, 2),    # odd sides: the last row and column are dropped by the pool
    (3, 5, 7, 9, 11, 0.2, 2),    # LeakyReLU
    (2, 4, 3, 6, 6, 1.0, 2),     # no activation, pooled
    (2, 6, 5, 3, 5, 0.0, 0),     # no pool
    (2, 6, 5, 3, 5, 0.2, 0),
    (3, 7, 6, 1, 1, 0.0, 0),     # BatchNorm1d after a Linear
    (3, 7, 6, 1, 1, 1.0, 0),     # BatchNorm1d alone
    (2, 5, 3, 4, 4, 1.0, 0),     # BatchNorm alone
    (2, 3, 4, 3, 3, 0.0, 2),     # conv4's last block (3x3 -> 1x1)
    (4, 10, 64, 14, 14, 0.0, 2),  # realistic conv4 size
    (2, 3, 3, 5, 37, 0.1, 2),    # rows of 18 windows: more than one 16-lane vector per row
]


def block_inputs(T, N, Cc, H, W, pool, dtype, seed):
    rnd = make_rnd(seed, dtype)
    z, rz = rnd(T, N, Cc, H, W), rnd(T, N, Cc, H, W)
    gamma, beta = 1 + rnd(T, Cc), rnd(T, Cc)
    ug, ub = rnd(T, Cc), rnd(T, Cc)
    Ho, Wo = (H // 2, W // 2) if pool == 2 else (H, W)
    dout, rdout = rnd(T, N, Cc, Ho, Wo), rnd(T, N, Cc, Ho, Wo)
    return z, rz, gamma, beta, ug, ub, dout, rdout


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("T,N,Cc,H,W,slope,pool", BLOCK_CASES)
def test_bn_act_pool(T, N, Cc, H, W, slope, pool, dtype):
    z, rz, gamma, beta, ug, ub, dout, rdout = block_inputs(T, N, Cc, H, W, pool, dtype, T * 100 + Cc + H)
    tl = tol(dtype)

    # forward
    got = C.bn_act_pool_forward(z, gamma, beta, EPS, slope, pool)
    exp = R.bn_act_pool_forward(z, gamma, beta, EPS, slope, pool)
    same_nones(got, exp)
    for g_, e_ in zip(got, exp):
        if e_ is not None:
            assert g_.shape == e_.shape and g_.dtype == e_.dtype
    assert rel(got[:3], exp[:3]) <= tl
    if pool == 2:
        agree = (got[3] == exp[3]).double().mean().item()
        assert agree == 1.0 if dtype == torch.float64 else agree > 0.999
    # the later passes get the reference's forward results (as the engine hands them on)
    out, mean, rstd, idx = exp

    # backward
    got = C.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    exp = R.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    assert rel(got, exp) <= tl

    # R-forward and R-backward, every combination of None directions
    combos = list(itertools.product([True, False], repeat=3))
    if z.numel() > 100000:  # the realistic size: the full directions and the inner loop's (no R{z})
        combos = [(True, True, True), (False, True, False)]
    for has_rz, has_ug, has_ub in combos:
        rz_, ug_, ub_ = (rz if has_rz else None), (ug if has_ug else None), (ub if has_ub else None)
        got = C.bn_act_pool_rforward(rz_, z, mean, rstd, gamma, beta, ug_, ub_, idx, slope, pool)
        exp = R.bn_act_pool_rforward(rz_, z, mean, rstd, gamma, beta, ug_, ub_, idx, slope, pool)
        if any(float(e.norm()) > 0 for e in exp):
            assert rel(got, exp) <= tl, (has_rz, has_ug, has_ub)
        else:
            assert all(float(g_.abs().max()) == 0 for g_ in got)
        _, rmean, q = exp
        if has_ub:  # R-backward does not read ubeta
            continue
        for has_rdout in (True, False):
            rd_ = rdout if has_rdout else None
            got = C.bn_act_pool_rbackward(dout, rd_, z, rz_, mean, rstd, rmean, q, gamma, beta, ug_, idx, slope, pool)
            exp = R.bn_act_pool_rbackward(dout, rd_, z, rz_, mean, rstd, rmean, q, gamma, beta, ug_, idx, slope, pool)
            assert rel(got, exp) <= tl, (has_rz, has_ug, has_rdout)


def test_bn_act_pool_shared_affine_expanded():
    # a shared gamma/beta is passed expanded to [T, C]
    z, rz, gamma, beta, ug, ub, dout, rdout = block_inputs(3, 5, 4, 7, 9, 2, torch.float64, 5)
    ge, be = gamma[0].expand(3, -1), beta[0].expand(3, -1)
    got = C.bn_act_pool_forward(z, ge, be, EPS, 0.0, 2)
    exp = R.bn_act_pool_forward(z, ge, be, EPS, 0.0, 2)
    assert rel(got, exp) <= F64_TOL
    _, mean, rstd, idx = exp
    assert rel(C.bn_act_pool_backward(dout, z, mean, rstd, ge, be, idx, 0.0, 2),
               R.bn_act_pool_backward(dout, z, mean, rstd, ge, be, idx, 0.0, 2)) <= F64_TOL


def test_bn_act_pool_threads_bit_identical():
    # enough (task, channel) items that both threads get work
    z, rz, gamma, beta, ug, ub, dout, rdout = block_inputs(4, 10, 64, 14, 14, 2, torch.float32, 9)
    z1 = z[:, :, :16, :7, :9].contiguous()  # odd sides too
    old = torch.get_num_threads()

    def run(zz):
        T, N, Cc, H, W = zz.shape
        sl = (slice(None), slice(None), slice(0, Cc), slice(0, H // 2), slice(0, W // 2))
        g_, b_, u_, v_ = gamma[:, :Cc], beta[:, :Cc], ug[:, :Cc], ub[:, :Cc]
        r_, d_, rd_ = rz[:, :, :Cc, :H, :W], dout[sl], rdout[sl]
        out, mean, rstd, idx = C.bn_act_pool_forward(zz, g_, b_, EPS, 0.1, 2)
        bwd = C.bn_act_pool_backward(d_, zz, mean, rstd, g_, b_, idx, 0.1, 2)
        rf = C.bn_act_pool_rforward(r_, zz, mean, rstd, g_, b_, u_, v_, idx, 0.1, 2)
        rb = C.bn_act_pool_rbackward(d_, rd_, zz, r_, mean, rstd, rf[1], rf[2], g_, b_, u_, idx, 0.1, 2)
        return [out, mean, rstd, idx, *bwd, *rf, *rb]

    try:
        for zz in (z, z1):
            torch.set_num_threads(1)
            a = run(zz)
            torch.set_num_threads(2)
            b = run(zz)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    finally:
        torch.set_num_threads(old)


# Shapes for the two builds of the BatchNorm kernels (baseline and AVX-512): odd sizes, slices
# (H*W) and items (N*H*W) not multiples of the vector widths (16 floats, 8 doubles), rows of more
# than one vector of windows, no pool, 1x1.
ISA_CASES = [
    # T, N, C, H, W, slope, pool
    (2, 3, 5, 9, 11, 0.0, 2),
    (2, 5, 3, 7, 7, 0.2, 2),
    (2, 3, 3, 3, 3, 0.0, 2),
    (2, 3, 2, 6, 37, 0.1, 2),
    (2, 4, 3, 5, 34, 1.0, 2),
    (2, 7, 3, 3, 5, 0.2, 0),
    (3, 7, 6, 1, 1, 0.0, 0),
    (2, 5, 4, 28, 28, 0.0, 2),
]


def _all_directions(z, rz, gamma, beta, ug, ub, dout, rdout, slope, pool):
    """Every output of the four directions, with and without the optional directions."""
    out, mean, rstd, idx = C.bn_act_pool_forward(z, gamma, beta, EPS, slope, pool)
    res = [out, mean, rstd, idx]
    res += C.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    for rz_, ug_, ub_, rd_ in ((rz, ug, ub, rdout), (None, ug, None, None), (rz, None, None, None),
                               (None, None, ub, rdout)):
        rout, rmean, q = C.bn_act_pool_rforward(rz_, z, mean, rstd, gamma, beta, ug_, ub_, idx, slope, pool)
        res += [rout, rmean, q]
        res += C.bn_act_pool_rbackward(dout, rd_, z, rz_, mean, rstd, rmean, q, gamma, beta, ug_, idx, slope, pool)
    return [t for t in res if t is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("T,N,Cc,H,W,slope,pool", ISA_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["randn", "ties"])
def test_bn_act_pool_isa_builds_bit_identical(T, N, Cc, H, W, slope, pool, dtype, ties, monkeypatch):
    # The AVX-512 build (vector tails by masks, max-pool in intrinsics, fused backward loops)
    # against the baseline build: the same bits, every output; and both against the reference.
    if torch.ops.fastmaml.bn_kernels_isa() != "avx512":
        pytest.skip("this CPU runs the baseline build only (no AVX-512)")
    z, rz, gamma, beta, ug, ub, dout, rdout = block_inputs(T, N, Cc, H, W, pool, dtype, 17 * H + W + Cc)
    if ties:  # few distinct values: ties within pooling windows after the activation
        z = torch.randint(-2, 3, z.shape, generator=torch.Generator().manual_seed(H * W)).to(dtype)
    args = (z, rz, gamma, beta, ug, ub, dout, rdout, slope, pool)
    fast = _all_directions(*args)
    monkeypatch.setenv("FASTMAML_CPU_ISA", "base")
    assert torch.ops.fastmaml.bn_kernels_isa() == "base"
    base = _all_directions(*args)
    monkeypatch.delenv("FASTMAML_CPU_ISA")
    assert len(fast) == len(base)
    for i, (a, b) in enumerate(zip(fast, base)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), i
    exp = R.bn_act_pool_forward(z, gamma, beta, EPS, slope, pool)
    assert rel(fast[:3], exp[:3]) <= tol(dtype)
    if pool == 2 and dtype == torch.float64:
        assert torch.equal(fast[3], exp[3])
    _, mean, rstd, idx = exp
    assert rel(C.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool),
               R.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool)) <= tol(dtype)


def test_bad_arguments():
    z = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    g, b = torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="pool must be 0 or 2"):
        C.bn_act_pool_forward(z, g, b, EPS, 0.0, 3)
    with pytest.raises(RuntimeError, match="gamma must be"):
        C.bn_act_pool_forward(z, g[:, :3], b, EPS, 0.0, 2)
    out, mean, rstd, idx = C.bn_act_pool_forward(z, g, b, EPS, 0.0, 2)
    with pytest.raises(RuntimeError, match="idx is required"):
        C.bn_act_pool_backward(out, z, mean, rstd, g, b, None, 0.0, 2)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        C.bn_act_pool_backward(z, z, mean, rstd, g, b, idx, 0.0, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.bn_act_pool_forward(z.half(), g.half(), b.half(), EPS, 0.0, 2)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, dispatch)
# ---------------------------------------------------------------------------------------------

def _opcheck_cases():
    rnd = make_rnd(3, torch.float64)
    x, w, b = rnd(2, 3, 2, 5, 6), rnd(2, 4, 2, 3, 3), rnd(2, 4)
    dy = rnd(2, 3, 4, 5, 6)
    z, rz = rnd(2, 3, 4, 5, 7), rnd(2, 3, 4, 5, 7)
    g, be, ug, ub = 1 + rnd(2, 4), rnd(2, 4), rnd(2, 4), rnd(2, 4)
    out, mean, rstd, idx = R.bn_act_pool_forward(z, g, be, EPS, 0.1, 2)
    d, rd = rnd(*out.shape), rnd(*out.shape)
    _, rmean, q = R.bn_act_pool_rforward(rz, z, mean, rstd, g, be, ug, ub, idx, 0.1, 2)
    ops = torch.ops.fastmaml
    return [
        ("conv2d_tasks", ops.conv2d_tasks, (x, w, b, 1, 1)),
        ("conv2d_tasks nobias s2", ops.conv2d_tasks, (x, w, None, 2, 1)),
        ("conv2d_tasks_backward", ops.conv2d_tasks_backward, (dy, x, w, 1, 1, True, True, True)),
        ("conv2d_tasks_backward dw", ops.conv2d_tasks_backward, (dy, x, w, 1, 1, False, True, False)),
        ("bn_act_pool_forward", ops.bn_act_pool_forward, (z, g, be, EPS, 0.1, 2)),
        ("bn_act_pool_forward nopool", ops.bn_act_pool_forward, (z, g, be, EPS, 0.0, 0)),
        ("bn_act_pool_backward", ops.bn_act_pool_backward, (d, z, mean, rstd, g, be, idx, 0.1, 2)),
        ("bn_act_pool_rforward", ops.bn_act_pool_rforward, (rz, z, mean, rstd, g, be, ug, ub, idx, 0.1, 2)),
        ("bn_act_pool_rforward none", ops.bn_act_pool_rforward, (None, z, mean, rstd, g, be, None, None, idx, 0.1, 2)),
        ("bn_act_pool_rbackward", ops.bn_act_pool_rbackward,
         (d, rd, z, rz, mean, rstd, rmean, q, g, be, ug, idx, 0.1, 2)),
        ("bn_act_pool_rbackward none", ops.bn_act_pool_rbackward,
         (d, None, z, None, mean, rstd, rmean, q, g, be, None, idx, 0.1, 2)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    name, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
