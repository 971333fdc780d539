"""The Triton layer kernels (fastmaml/triton/layers/) against the reference (fastmaml/layers/torch_kernels.py).

Without CUDA the kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1, set below
before triton is imported); with CUDA the compiled kernels run on the GPU. The interpreter is slow
(milliseconds per program instance), so the shapes are small and odd: T = 2 tasks, N = 3, C = 3 channels, 7 x 5 images (an odd last row and column for the pool).

Each case draws fresh non-uniform inputs (per-channel offsets and scales) in the tested dtype, seeded
from the test's id, runs the reference on float64 copies of the same values, and compares every
output by its relative error over the whole tensor, ||got - ref|| / ||ref||:
float64 <= 1e-12 (FP64_TOL), float32 <= 2e-5 (FP32_TOL; measured: <= 3.1e-6 on these cases, the worst
being q = mean(xh R{z}), a sum with cancellation; 8.3e-6 for activations offset by 1000 std, where
the float32 rounding of the mean itself is 3e-5).
The pass's own upstream inputs (mean, rstd, idx, rmean, q) come from the float64 reference, so every
function is tested on its own.
"""

import itertools
import os
import zlib

import pytest
import torch

# Without CUDA, the interpreter (chosen before triton loads; tests/conftest.py does the same). With
# CUDA, the compiled kernels are tested (unless TRITON_INTERPRET=1 is set by hand).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (set it before triton is imported)",
                allow_module_level=True)

from fastmaml.layers import torch_kernels as ref  # noqa: E402
from fastmaml.triton import layers as tl_layers  # noqa: E402

FP64_TOL = 1e-12
FP32_TOL = 2e-5
TOL = {torch.float64: FP64_TOL, torch.float32: FP32_TOL}
EPS = 1e-5
SHAPE = (2, 3, 3, 7, 5)  # T, N, C, H, W
POOLS = [0, 2]
SLOPES = [0.0, 0.2, 1.0]


def _gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def _activation(gen, shape, dtype):
    """Non-uniform: per-(task, channel) offsets and scales, so that means and variances differ."""
    T, N, C, H, W = shape
    off = _randn(gen, T, 1, C, 1, 1) * 3
    scale = _randn(gen, T, 1, C, 1, 1).abs() + 0.5
    return (_randn(gen, *shape) * scale + off).to(dtype)


def _d(t):
    """float64 copy for the reference (None stays None)."""
    return None if t is None else t.to(torch.float64)


def _rel(got, want) -> float:
    got = got.to(torch.float64)
    want = want.to(torch.float64)
    den = want.norm().item()
    num = (got - want).norm().item()
    return num if den == 0 else num / den


def _check(got, want, dtype, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == dtype, (what, got.dtype)
    err = _rel(got, want)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


class _Case:
    """Inputs of one (dtype, pool, slope) case and the float64 reference forward on them."""

    def __init__(self, request, dtype, pool, slope, shape=SHAPE, expand_gamma=False):
        gen = _gen(request)
        self.dtype, self.pool, self.slope = dtype, pool, slope
        T, N, C, H, W = shape
        self.z = _activation(gen, shape, dtype)
        if expand_gamma:  # a shared parameter, passed expanded (stride 0 over the tasks)
            self.gamma = _randn(gen, 1, C, dtype=dtype).expand(T, C)
            self.beta = _randn(gen, 1, C, dtype=dtype).expand(T, C)
        else:
            self.gamma = _randn(gen, T, C, dtype=dtype)
            self.beta = _randn(gen, T, C, dtype=dtype)
        out, mean, rstd, idx = ref.bn_act_pool_forward(_d(self.z), _d(self.gamma), _d(self.beta), EPS, slope, pool)
        self.ref_fwd = (out, mean, rstd, idx)
        self.mean, self.rstd, self.idx = mean.to(dtype), rstd.to(dtype), idx
        self.dout = _randn(gen, *out.shape, dtype=dtype)
        self.rdout = _randn(gen, *out.shape, dtype=dtype)
        self.rz = _activation(gen, shape, dtype)
        self.ugamma = _randn(gen, T, C, dtype=dtype)
        self.ubeta = _randn(gen, T, C, dtype=dtype)


def _check_idx(got_idx, case):
    """idx equal to the reference's, except (float32 only) at windows whose top values are within
    rounding of each other, where either choice is right."""
    want = case.ref_fwd[3]
    assert got_idx.dtype == torch.uint8 and got_idx.shape == want.shape
    diff = got_idx != want
    if not diff.any():
        return
    assert case.dtype != torch.float64, "float64 idx differs from the reference"
    # h at the window positions (reference values), compare the two chosen entries.
    T, N, C, H, W = case.z.shape
    a = ref._stats_view(_d(case.gamma)) * ref._xh(_d(case.z), case.ref_fwd[1], case.ref_fwd[2]) \
        + ref._stats_view(_d(case.beta))
    h = ref.act_forward(a, case.slope)
    g1 = ref._pool_gather(h, want, 2)
    g2 = ref._pool_gather(h, got_idx.to(want.device), 2)
    assert torch.allclose(g1[diff], g2[diff], rtol=1e-5, atol=1e-6), "idx differs at a window without a near-tie"


# ---------------------------------------------------------------------------------------------
# BatchNorm + activation + max-pool
# ---------------------------------------------------------------------------------------------

CASES = [(dt, pool, slope) for dt in (torch.float64, torch.float32) for pool in POOLS for slope in SLOPES]
CASE_IDS = [f"{str(dt)[6:]}-pool{pool}-slope{slope}" for dt, pool, slope in CASES]


@pytest.mark.parametrize("dtype,pool,slope", CASES, ids=CASE_IDS)
def test_bn_forward_backward(request, dtype, pool, slope):
    c = _Case(request, dtype, pool, slope)
    out, mean, rstd, idx = tl_layers.bn_act_pool_forward(c.z, c.gamma, c.beta, EPS, slope, pool)
    _check(out, c.ref_fwd[0], dtype, "out")
    _check(mean, c.ref_fwd[1], dtype, "mean")
    _check(rstd, c.ref_fwd[2], dtype, "rstd")
    if pool == 0:
        assert idx is None
    else:
        _check_idx(idx, c)
    got = tl_layers.bn_act_pool_backward(c.dout, c.z, c.mean, c.rstd, c.gamma, c.beta, c.idx, slope, pool)
    want = ref.bn_act_pool_backward(_d(c.dout), _d(c.z), c.ref_fwd[1], c.ref_fwd[2], _d(c.gamma), _d(c.beta),
                                    c.idx, slope, pool)
    for name, g, w in zip(("dz", "dgamma", "dbeta"), got, want):
        _check(g, w, dtype, name)


# Which directions are present (the kernels' HAS_* flags are compile-time: one code path per pattern
# and pool). float64: all 8 patterns with slope 0.2 for both pools; with slopes 0 and 1 (a runtime
# scalar, the same code path) and in float32: all present and all absent.
# FASTMAML_TRITON_FULL=1: all 8 patterns for every dtype, pool and slope (about 1.5x the time).
_ALL_PATTERNS = list(itertools.product([True, False], repeat=3))
_FULL = os.environ.get("FASTMAML_TRITON_FULL") == "1"


def _r_patterns(dtype, slope):
    if _FULL or (dtype == torch.float64 and slope == 0.2):
        return _ALL_PATTERNS
    return [(True, True, True), (False, False, False)]


@pytest.mark.parametrize("dtype,pool,slope", CASES, ids=CASE_IDS)
def test_bn_rforward(request, dtype, pool, slope):
    c = _Case(request, dtype, pool, slope)
    for has_rz, has_ug, has_ub in _r_patterns(dtype, slope):
        rz = c.rz if has_rz else None
        ug = c.ugamma if has_ug else None
        ub = c.ubeta if has_ub else None
        what = f"rz={has_rz} ugamma={has_ug} ubeta={has_ub}"
        got = tl_layers.bn_act_pool_rforward(rz, c.z, c.mean, c.rstd, c.gamma, c.beta, ug, ub, c.idx, slope, pool)
        want = ref.bn_act_pool_rforward(_d(rz), _d(c.z), c.ref_fwd[1], c.ref_fwd[2], _d(c.gamma), _d(c.beta),
                                        _d(ug), _d(ub), c.idx, slope, pool)
        for name, g, w in zip(("rout", "rmean", "q"), got, want):
            _check(g, w, dtype, f"{name} ({what})")


@pytest.mark.parametrize("dtype,pool,slope", CASES, ids=CASE_IDS)
def test_bn_rbackward(request, dtype, pool, slope):
    c = _Case(request, dtype, pool, slope)
    for has_rdout, has_rz, has_ug in _r_patterns(dtype, slope):
        rdout = c.rdout if has_rdout else None
        rz = c.rz if has_rz else None
        ug = c.ugamma if has_ug else None
        # rmean and q as the R-forward gives them for this rz (zeros without one).
        _, rmean, q = ref.bn_act_pool_rforward(_d(rz), _d(c.z), c.ref_fwd[1], c.ref_fwd[2], _d(c.gamma),
                                               _d(c.beta), None, None, c.idx, slope, pool)
        what = f"rdout={has_rdout} rz={has_rz} ugamma={has_ug}"
        got = tl_layers.bn_act_pool_rbackward(c.dout, rdout, c.z, rz, c.mean, c.rstd, rmean.to(dtype), q.to(dtype),
                                              c.gamma, c.beta, ug, c.idx, slope, pool)
        want = ref.bn_act_pool_rbackward(_d(c.dout), _d(rdout), _d(c.z), _d(rz), c.ref_fwd[1], c.ref_fwd[2], rmean,
                                         q, _d(c.gamma), _d(c.beta), _d(ug), c.idx, slope, pool)
        for name, g, w in zip(("rdz", "rdgamma", "rdbeta"), got, want):
            _check(g, w, dtype, f"{name} ({what})")


def test_bn_rbackward_nonzero_rmean_q_without_rz(request):
    """rz absent but rmean, q given (the reference treats R{z} as 0 and still uses them)."""
    c = _Case(request, torch.float64, 2, 0.2)
    gen = _gen(request)
    rmean, q = _randn(gen, 2, 3), _randn(gen, 2, 3)
    got = tl_layers.bn_act_pool_rbackward(c.dout, c.rdout, c.z, None, c.mean, c.rstd, rmean, q, c.gamma, c.beta,
                                          c.ugamma, c.idx, 0.2, 2)
    want = ref.bn_act_pool_rbackward(c.dout, c.rdout, c.z, None, c.mean, c.rstd, rmean, q, c.gamma, c.beta,
                                     c.ugamma, c.idx, 0.2, 2)
    for name, g, w in zip(("rdz", "rdgamma", "rdbeta"), got, want):
        _check(g, w, torch.float64, name)


def _all_four(request, c, pool, slope):
    """Every function of the case against the reference (all directions present), float64."""
    got = tl_layers.bn_act_pool_forward(c.z, c.gamma, c.beta, EPS, slope, pool)
    for name, g, w in zip(("out", "mean", "rstd"), got, c.ref_fwd):
        _check(g, w, c.dtype, name)
    if pool:
        _check_idx(got[3], c)
    got = tl_layers.bn_act_pool_backward(c.dout, c.z, c.mean, c.rstd, c.gamma, c.beta, c.idx, slope, pool)
    want = ref.bn_act_pool_backward(c.dout, c.z, c.mean, c.rstd, c.gamma, c.beta, c.idx, slope, pool)
    for name, g, w in zip(("dz", "dgamma", "dbeta"), got, want):
        _check(g, w, c.dtype, name)
    got = tl_layers.bn_act_pool_rforward(c.rz, c.z, c.mean, c.rstd, c.gamma, c.beta, c.ugamma, c.ubeta, c.idx,
                                         slope, pool)
    want = ref.bn_act_pool_rforward(c.rz, c.z, c.mean, c.rstd, c.gamma, c.beta, c.ugamma, c.ubeta, c.idx,
                                    slope, pool)
    for name, g, w in zip(("rout", "rmean", "q"), got, want):
        _check(g, w, c.dtype, name)
    rmean, q = want[1], want[2]
    got = tl_layers.bn_act_pool_rbackward(c.dout, c.rdout, c.z, c.rz, c.mean, c.rstd, rmean, q, c.gamma, c.beta,
                                          c.ugamma, c.idx, slope, pool)
    want = ref.bn_act_pool_rbackward(c.dout, c.rdout, c.z, c.rz, c.mean, c.rstd, rmean, q, c.gamma, c.beta,
                                     c.ugamma, c.idx, slope, pool)
    for name, g, w in zip(("rdz", "rdgamma", "rdbeta"), got, want):
        _check(g, w, c.dtype, name)


def test_bn_small_blocks(request, monkeypatch):
    """Blocks of 32 elements: several loop iterations per (task, channel) and a masked tail
    (N H W = 3 * 7 * 5 = 105 = 3 * 32 + 9; pooled 3 * 3 * 2 = 18), for both pools."""
    monkeypatch.setattr(tl_layers.batchnorm, "_BN_MIN_BLOCK", 16)
    monkeypatch.setattr(tl_layers.batchnorm, "_BN_MAX_BLOCK", 32)
    for pool in POOLS:
        _all_four(request, _Case(request, torch.float64, pool, 0.2), pool, 0.2)


def test_bn_even_sizes_expanded_params(request):
    """Even sides (no dropped row/column), one task sharing expanded gamma/beta (stride 0)."""
    shape = (3, 2, 2, 6, 4)
    _all_four(request, _Case(request, torch.float64, 2, 0.0, shape=shape, expand_gamma=True), 2, 0.0)


def test_bn_1d(request):
    """BatchNorm1d: H = W = 1, no pool."""
    _all_four(request, _Case(request, torch.float64, 0, 0.2, shape=(2, 5, 4, 1, 1)), 0, 0.2)


def test_bn_float32_large_offset(request):
    """A mean far from zero (1e3 std) does not cost the float32 variance its precision."""
    c = _Case(request, torch.float32, 0, 1.0)
    c.z = (c.z.double() + 1000.0).float()
    want = ref.bn_act_pool_forward(_d(c.z), _d(c.gamma), _d(c.beta), EPS, 1.0, 0)
    got = tl_layers.bn_act_pool_forward(c.z, c.gamma, c.beta, EPS, 1.0, 0)
    for name, g, w in zip(("out", "mean", "rstd"), got, want):
        _check(g, w, torch.float32, name)


# ---------------------------------------------------------------------------------------------
# One-input-channel convolution (the first layer)
# ---------------------------------------------------------------------------------------------

CONV_CASES = [(dt, stride) for dt in (torch.float64, torch.float32) for stride in (1, 2)]


@pytest.mark.parametrize("dtype,stride", CONV_CASES, ids=[f"{str(d)[6:]}-stride{s}" for d, s in CONV_CASES])
def test_conv_cin1(request, dtype, stride):
    gen = _gen(request)
    T, N, O, H, W = 2, 3, 5, 9, 7  # O not a power of two; odd sides
    x = _activation(gen, (T, N, 1, H, W), dtype)
    w = _randn(gen, T, O, 1, 3, 3, dtype=dtype)
    b = _randn(gen, T, O, dtype=dtype)
    for bias in (b, None):
        got = tl_layers.conv2d_cin1_forward(x, w, bias, stride, 1)
        want = ref.conv2d_forward(_d(x), _d(w), _d(bias), stride, 1)
        _check(got, want, dtype, f"y (bias={bias is not None})")
        assert got.is_contiguous()
    dy = _randn(gen, *want.shape, dtype=dtype)
    got = tl_layers.conv2d_cin1_weight_grad(dy, x, stride, 1)
    _, want, _ = ref.conv2d_backward(_d(dy), _d(x), _d(w), stride, 1, need_dx=False, need_dw=True, need_bias=False)
    _check(got, want, dtype, "dw")


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_cin1_small_blocks_split(request, monkeypatch, stride):
    """16 pixels per program (several blocks and a masked tail), and the weight gradient's pixel
    chunks split over 3 programs per image (the GPU's path)."""
    monkeypatch.setattr(tl_layers.conv, "_CONV_PIX_BLOCK", 16)
    monkeypatch.setattr(tl_layers.conv, "_CONV_SPLIT", 3)
    gen = _gen(request)
    T, N, O, H, W = 2, 2, 3, 9, 8  # 72 pixels (stride 1) = 4 * 16 + 8; 20 (stride 2) = 16 + 4
    x = _activation(gen, (T, N, 1, H, W), torch.float64)
    w = _randn(gen, T, O, 1, 3, 3)
    b = _randn(gen, T, O)
    y = tl_layers.conv2d_cin1_forward(x, w, b, stride, 1)
    want = ref.conv2d_forward(x, w, b, stride, 1)
    _check(y, want, torch.float64, "y")
    dy = _randn(gen, *want.shape)
    got = tl_layers.conv2d_cin1_weight_grad(dy, x, stride, 1)
    _, want, _ = ref.conv2d_backward(dy, x, w, stride, 1, need_dx=False, need_dw=True, need_bias=False)
    _check(got, want, torch.float64, "dw")


def test_import_without_triton_raises_import_error(monkeypatch):
    """Without triton, importing the module raises ImportError (so that a dispatcher can fall back).
    The module's source is executed afresh under another name with triton hidden."""
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_fastmaml_triton_layers_without_triton", tl_layers.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="fastmaml.triton.layers needs triton"):
        spec.loader.exec_module(module)


_COMPILE_CHECK = r'''
import itertools, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fastmaml.triton import layers as L

target = GPUTarget("cuda", int(sys.argv[1]), 32)
fails = 0

def comp(fn, dt, consts, warps=4):
    global fails
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "idx_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dt
        elif name in ("eps", "slope", "Mtot"):
            sig[name] = "fp64"
        else:
            sig[name] = "i32"
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(consts)), target=target,
                           options={"num_warps": warps})
        assert len(k.asm["cubin"]) > 0
    except Exception as e:
        fails += 1
        print("FAIL", fn.__name__, dt, consts, repr(e)[:2000], flush=True)

for dt, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
    for pool, (block, warps) in itertools.product((0, 2), ((64, 1), (1024, 4))):
        base = dict(POOL=pool, ACC=acc, BLOCK=block)
        comp(L._bn_fwd_kernel, dt, base, warps)
        comp(L._bn_bwd_kernel, dt, base, warps)
        for on in (True, False):
            comp(L._bn_rfwd_kernel, dt, dict(base, HAS_RZ=on, HAS_UG=on, HAS_UB=on), warps)
            comp(L._bn_rbwd_kernel, dt, dict(base, HAS_RDOUT=on, HAS_RZ=on, HAS_UG=on), warps)
    for stride in (1, 2):
        conv = dict(STRIDE=stride, PAD=1, KH=3, KW=3, ACC=acc, OB=64, PB=64)
        comp(L._conv_cin1_fwd_kernel, dt, dict(conv, HAS_BIAS=stride == 1))
        comp(L._conv_cin1_wgrad_kernel, dt, dict(conv, KB=16))
print("failures:", fails)
sys.exit(1 if fails else 0)
'''


@pytest.mark.skipif(os.environ.get("FASTMAML_TRITON_COMPILE_CHECK") != "1",
                    reason="opt-in (FASTMAML_TRITON_COMPILE_CHECK=1; minutes of CPU): compiles the kernels for a GPU")
def test_kernels_compile_for_sm90():
    """The interpreter does not apply the compiler's rules (loop-carried types, constexpr branches,
    scalar types): compile every kernel, float32 and float64, for sm_90 (H100/H200) through ptxas
    to a cubin, which needs triton's bundled ptxas but no GPU."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK, "90"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
