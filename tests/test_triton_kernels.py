"""The Triton kernels (fastmaml/triton/ops.py) against the torch ops (fastmaml/kernels/flat_torch.py).

Without CUDA the kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1, set
below before triton is imported). With CUDA they run on the GPU; run with TRITON_INTERPRET=0
there to test the compiled kernels rather than the interpreter.

Each case builds fresh random inputs in the tested dtype (seeded from the test's id), runs the
reference on float64 copies of the same values, and compares with a tolerance for the dtype.
Float32 and float64 cases also run with a small launch configuration (256 columns per program,
2 tasks per program) that gives several column blocks, a masked tail and
tasks split over programs (the atomic per-element path of the reductions).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from fastmaml.kernels import flat_torch as ref  # noqa: E402
from fastmaml.triton import ops as tops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (atol, rtol) for element-wise results against the float64 reference.
TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 8e-3),
}
# Reductions: |got - exact| <= RED_TOL * sum |a * b| over the same entries (+ a tiny atol).
RED_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LR_FORMS = ["scalar", "segment_runs", "segment_random", "element"]


# (dtype, launch configuration): the small configuration only changes the control flow, which
# does not depend on the dtype, so it runs for float32 and float64 only (the interpreter is slow).
CASES = [(dt, "default") for dt in DTYPES] + [(torch.float32, "small"), (torch.float64, "small")]
CASE_IDS = [f"{str(dt).split('.')[-1]}-{cfg}" for dt, cfg in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def dtype(request, monkeypatch):
    """The dtype of a case; the "small" cases also force 256 columns and 2 tasks per program."""
    dt, cfg = request.param
    if cfg == "small":
        monkeypatch.setattr(tops, "_config", lambda P, T, device: (256, 2))
    return dt


@pytest.fixture
def gen(request):
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def make_lr(gen, form, P, dtype):
    """(lr, segments) of the given form for P elements."""
    if form == "scalar":
        lr, seg = torch.rand((), generator=gen, dtype=torch.float64) + 0.1, None
    elif form == "segment_runs":  # sorted ids: runs of one id, the usual layout
        S = 3
        seg = torch.sort(torch.randint(0, S, (P,), generator=gen)).values
        lr = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
    elif form == "segment_random":  # arbitrary ids spanning more than a few values per block
        S = 13
        seg = torch.randint(0, S, (P,), generator=gen)
        lr = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
    else:
        lr, seg = torch.rand(P, generator=gen, dtype=torch.float64) + 0.1, None
    return lr.to(dtype).to(DEVICE), (None if seg is None else seg.to(DEVICE))


def d64(x):
    return None if x is None else x.double()


def check_close(got, expected, dtype):
    assert got.dtype == dtype
    assert got.shape == expected.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


def check_reduction(got, expected, magnitude, dtype):
    """got ~ expected (float64) within RED_TOL[dtype] * magnitude (the same reduction of |a*b|)."""
    assert got.dtype == dtype
    assert got.shape == expected.shape
    err = (got.double() - expected).abs()
    bound = RED_TOL[dtype] * magnitude + 1e-30
    assert bool((err <= bound).all()), f"max err {err.max().item()}, bound {bound.min().item()}"


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize(
    "theta_shape,grad_shape",
    [((1, 37), (1, 37)), ((7, 1001), (7, 1001)), ((1001,), (7, 1001)), ((7, 1001), (1001,)), ((37,), (37,))],
    ids=["T1", "T7", "theta_P", "grad_P", "both_P"],
)
def test_inner_update(dtype, form, theta_shape, grad_shape, gen):
    P = theta_shape[-1]
    theta, grad = randn(gen, theta_shape, dtype), randn(gen, grad_shape, dtype)
    lr, seg = make_lr(gen, form, P, dtype)
    got = tops.inner_update(theta, grad, lr, seg)
    expected = ref.inner_update(d64(theta), d64(grad), d64(lr), seg)
    check_close(got, expected, dtype)
    assert got.data_ptr() not in (theta.data_ptr(), grad.data_ptr())


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("shape", [(37,), (1, 1001), (7, 1001)], ids=["P", "T1", "T7"])
def test_scale(dtype, form, shape, gen):
    v = randn(gen, shape, dtype)
    lr, seg = make_lr(gen, form, shape[-1], dtype)
    got = tops.scale(v, lr, seg)
    check_close(got, ref.scale(d64(v), d64(lr), seg), dtype)
    assert got.data_ptr() != v.data_ptr()


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("shape", [(37,), (1, 1001), (7, 1001)], ids=["P", "T1", "T7"])
def test_segment_dot(dtype, form, shape, gen):
    a, b = randn(gen, shape, dtype), randn(gen, shape, dtype)
    lr, seg = make_lr(gen, form, shape[-1], dtype)
    got = tops.segment_dot(a, b, lr, seg)
    expected = ref.segment_dot(d64(a), d64(b), d64(lr), seg)
    magnitude = ref.segment_dot(d64(a).abs(), d64(b).abs(), d64(lr), seg)
    check_reduction(got, expected, magnitude, dtype)


@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("T,P", [(1, 37), (7, 1001)], ids=["T1", "T7"])
@pytest.mark.parametrize("has_hv", [False, True], ids=["no_hv", "hv"])
@pytest.mark.parametrize("has_gq", [False, True], ids=["no_gq", "gq"])
def test_reverse_step(dtype, form, T, P, has_hv, has_gq, gen):
    v, g = randn(gen, (T, P), dtype), randn(gen, (T, P), dtype)
    hv = randn(gen, (T, P), dtype) if has_hv else None
    gq = randn(gen, (T, P), dtype) if has_gq else None
    w = 0.3 if has_gq else 0.0
    lr, seg = make_lr(gen, form, P, dtype)
    out, d_lr = tops.reverse_step(v, hv, g, gq, w, lr, seg)
    exp_out, exp_d = ref.reverse_step(d64(v), d64(hv), d64(g), d64(gq), w, d64(lr), seg)
    check_close(out, exp_out, dtype)
    magnitude = ref.segment_dot(d64(v).abs(), d64(g).abs(), d64(lr), seg)
    check_reduction(d_lr, exp_d, magnitude, dtype)
    assert out.data_ptr() != v.data_ptr()


def test_reverse_step_w_zero_skips_gq(gen):
    """As in the reference, w == 0 drops the gq term entirely (a NaN in gq does not leak)."""
    T, P = 3, 37
    v, g = randn(gen, (T, P), torch.float32), randn(gen, (T, P), torch.float32)
    gq = torch.full((T, P), float("nan"), device=DEVICE)
    lr = torch.tensor(0.5, device=DEVICE)
    out, d_lr = tops.reverse_step(v, None, g, gq, 0.0, lr, None)
    torch.testing.assert_close(out, v)
    torch.testing.assert_close(d_lr, -(v.double() * g.double()).sum().float())


def test_reverse_step_w_float64_precision(gen):
    """w is passed at full float64 precision (a float32 w would be off by ~1e-9 here)."""
    T, P = 2, 37
    v, g, gq = (randn(gen, (T, P), torch.float64) for _ in range(3))
    lr = torch.rand(P, generator=gen, dtype=torch.float64).to(DEVICE)
    w = 0.1
    out, _ = tops.reverse_step(v, None, g, gq, w, lr, None)
    torch.testing.assert_close(out, v + w * gq, atol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("form", ["scalar", "segment_runs", "element"])
def test_empty(form, gen):
    lr, seg = make_lr(gen, form, 0, torch.float32)
    e = torch.empty((0, 0), device=DEVICE)
    if form == "element":
        assert tops.segment_dot(e, e, lr, seg).shape == lr.shape
    else:
        torch.testing.assert_close(tops.segment_dot(e, e, lr, seg), torch.zeros_like(lr))
    assert tops.inner_update(e, e, lr, seg).shape == (0, 0)
    assert tops.scale(e, lr, seg).shape == (0, 0)


def test_import_error_without_triton(monkeypatch):
    """Importing fastmaml.triton.ops raises ImportError (and nothing else) when triton is absent."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "fastmaml.triton.ops")  # restored after the test
    with pytest.raises(ImportError):
        importlib.import_module("fastmaml.triton.ops")
