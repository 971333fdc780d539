"""Smoke test of the C++ CPU kernels of ``fastmaml._C`` against ``fastmaml.kernels.flat_torch``.

Calls ``torch.ops.fastmaml.*`` directly (no Python validation in between), so it also checks the
C++ argument checks. The full cross-backend suite lives elsewhere; this one stays small.
"""

import importlib.util
import pathlib

import pytest
import torch

_C = pytest.importorskip("fastmaml._C", reason="the C++ extension fastmaml._C is not built")

from fastmaml.kernels import flat_torch as ref  # noqa: E402

ops = torch.ops.fastmaml

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
LR_FORMS = ["scalar", "segment", "segment_shuffled", "element"]
SHAPES = [(1, 1001), (7, 1001), (3, 1), (5, 4099), (2, 2048 * 3 + 5)]


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _lr(form, P, dtype, g):
    """(lr, segments) for a form; segments are contiguous runs like a parameter list, or shuffled."""
    if form == "scalar":
        return torch.rand((), generator=g, dtype=dtype) + 0.1, None
    if form == "element":
        return torch.rand(P, generator=g, dtype=dtype) + 0.1, None
    S = min(5, P)
    cuts = torch.sort(torch.randperm(P - 1, generator=g)[: S - 1] + 1).values if S > 1 else torch.tensor([], dtype=torch.long)
    segments = torch.zeros(P, dtype=torch.long)
    for c in cuts.tolist():
        segments[c:] += 1
    if form == "segment_shuffled":
        segments = segments[torch.randperm(P, generator=g)]
    return torch.rand(S, generator=g, dtype=dtype) + 0.1, segments


def _randn(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=dtype)


def test_schemas_match_python():
    # Load schemas.py by path: importing the fastmaml.kernels package would pull in far more.
    path = pathlib.Path(ref.__file__).resolve().parent.parent / "kernels" / "schemas.py"
    spec = importlib.util.spec_from_file_location("_fastmaml_schemas", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, schema in mod.SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == "fastmaml::" + schema


def test_the_extension_registers_exactly_the_schema_table():
    """fastmaml/kernels/schemas.py's TABLE is every op the project registers: the compiled extension
    defines no op outside it and each with its schema string; the layer families' fake kernels
    cover the layer ops."""
    from fastmaml.kernels.schemas import LAYER_SCHEMAS, TABLE
    from fastmaml.layers import batchnorm, conv

    want = {f"{ns}::{schema}" for ns, table in TABLE.items() for schema in table.values()}
    got = {str(getattr(getattr(torch.ops, ns), op).default._schema)
           for ns, op in (n.split("::") for n in torch._C._dispatch_get_all_op_names())
           if ns in TABLE}
    assert got == want, (sorted(got - want), sorted(want - got))
    assert set(conv.CPP_OPS) | set(batchnorm.CPP_OPS) == set(LAYER_SCHEMAS) - {"bn_kernels_isa"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("bcast", ["none", "theta", "grad", "both"])
def test_inner_update(dtype, form, T, P, bcast):
    g = _gen(1)
    lr, seg = _lr(form, P, dtype, g)
    theta = _randn((P,) if bcast in ("theta", "both") else (T, P), dtype, g)
    grad = _randn((P,) if bcast in ("grad", "both") else (T, P), dtype, g)
    out = ops.inner_update(theta, grad, lr, seg)
    expect = ref.inner_update(theta, grad, lr, seg)
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("one_d", [False, True])
def test_scale_and_segment_dot(dtype, form, T, P, one_d):
    g = _gen(2)
    lr, seg = _lr(form, P, dtype, g)
    shape = (P,) if one_d else (T, P)
    a, b = _randn(shape, dtype, g), _randn(shape, dtype, g)
    torch.testing.assert_close(ops.scale(a, lr, seg), ref.scale(a, lr, seg), **TOL[dtype])
    out = ops.segment_dot(a, b, lr, seg)
    expect = ref.segment_dot(a.double(), b.double(), lr.double(), seg).to(dtype)
    assert out.shape == lr.shape and out.dtype == dtype
    torch.testing.assert_close(out, expect, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", LR_FORMS)
@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("has_hv", [True, False])
@pytest.mark.parametrize("has_gq,w", [(True, 0.7), (False, 0.0), (True, 0.0)])
def test_reverse_step(dtype, form, T, P, has_hv, has_gq, w):
    g = _gen(3)
    lr, seg = _lr(form, P, dtype, g)
    v, gs = _randn((T, P), dtype, g), _randn((T, P), dtype, g)
    hv = _randn((T, P), dtype, g) if has_hv else None
    gq = _randn((T, P), dtype, g) if has_gq else None
    out, d_lr = ops.reverse_step(v, hv, gs, gq, w, lr, seg)
    e_out, e_dlr = ref.reverse_step(v, hv, gs, gq, w, lr, seg)
    torch.testing.assert_close(out, e_out, **TOL[dtype])
    _, e_dlr64 = ref.reverse_step(v.double(), None, gs.double(), None, 0.0, lr.double(), seg)
    assert d_lr.shape == lr.shape
    torch.testing.assert_close(d_lr, e_dlr64.to(dtype), **TOL[dtype])
    for x in (v, hv, gs, gq):
        if x is not None:
            assert out.data_ptr() != x.data_ptr()


def test_reduction_deterministic_across_threads():
    g = _gen(4)
    P = 2048 * 9 + 17
    lr, seg = _lr("segment", P, torch.float32, g)
    a, b = _randn((6, P), torch.float32, g), _randn((6, P), torch.float32, g)
    n = torch.get_num_threads()
    try:
        results = []
        for threads in (1, max(2, n)):
            torch.set_num_threads(threads)
            results.append(ops.segment_dot(a, b, lr, seg))
            results.append(ops.reverse_step(a, None, b, None, 0.0, lr, seg)[1])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_empty_sizes():
    lr = torch.rand(3)
    seg = torch.zeros(0, dtype=torch.long)
    a = torch.randn(4, 0)
    assert ops.inner_update(a, a, lr, seg).shape == (4, 0)
    torch.testing.assert_close(ops.segment_dot(a, a, lr, seg), torch.zeros(3))
    a = torch.randn(0, 10)
    seg = torch.zeros(10, dtype=torch.long)
    torch.testing.assert_close(ops.segment_dot(a, a, lr, seg), torch.zeros(3))
    torch.testing.assert_close(ops.reverse_step(a, None, a, None, 1.0, torch.tensor(0.5), None)[1],
                               torch.tensor(0.0))


def test_bad_inputs_raise():
    t7 = torch.randn(7, 1001)
    lr = torch.tensor(0.1)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[7, 1001\] or \[1001\] \(matching theta\), got \[7, 1000\]"):
        ops.inner_update(t7, torch.randn(7, 1000), lr, None)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.inner_update(t7, torch.randn(6, 1001), lr, None)
    with pytest.raises(RuntimeError, match="grad must have dtype"):
        ops.inner_update(t7, t7.double(), lr, None)
    with pytest.raises(RuntimeError, match="lr must have dtype"):
        ops.inner_update(t7, t7, lr.double(), None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.scale(t7.half(), lr.half(), None)
    with pytest.raises(RuntimeError, match="1-D"):
        ops.scale(torch.randn(2, 3, 4), lr, None)
    with pytest.raises(RuntimeError, match=r"without segments is per element and must have shape \[1001\]"):
        ops.scale(t7, torch.rand(5), None)
    with pytest.raises(RuntimeError, match="segments must be an int64"):
        ops.scale(t7, torch.rand(5), torch.zeros(1001, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"segments must have shape \[1001\]"):
        ops.scale(t7, torch.rand(5), torch.zeros(1000, dtype=torch.long))
    with pytest.raises(RuntimeError, match="lr must be 0-d"):
        ops.scale(t7, torch.rand(5, 1), None)
    with pytest.raises(RuntimeError, match=r"b must have shape \[7, 1001\]"):
        ops.segment_dot(t7, torch.randn(1001), lr, None)
    with pytest.raises(RuntimeError, match=r"hv must have shape \[7, 1001\]"):
        ops.reverse_step(t7, torch.randn(6, 1001), t7, None, 1.0, lr, None)
    with pytest.raises(RuntimeError, match=r"gq must have shape \[7, 1001\]"):
        ops.reverse_step(t7, None, t7, torch.randn(7, 3), 1.0, lr, None)
    seg = torch.zeros(1001, dtype=torch.long)
    for bad in (5, -1):
        seg[600] = bad
        with pytest.raises(RuntimeError, match=rf"segments\[600\] = {bad} is out of range"):
            ops.inner_update(t7, t7, torch.rand(5), seg)
        with pytest.raises(RuntimeError, match=r"segments\[600\]"):
            ops.scale(t7, torch.rand(5), seg)
        with pytest.raises(RuntimeError, match=r"segments\[600\]"):
            ops.segment_dot(t7, t7, torch.rand(5), seg)
        with pytest.raises(RuntimeError, match=r"segments\[600\]"):
            ops.reverse_step(t7, None, t7, None, 0.0, torch.rand(5), seg)
    # Fragmented ids take the gather path: the check must hold there too.
    seg = torch.randint(0, 5, (1001,))
    seg[17] = 9
    with pytest.raises(RuntimeError, match=r"segments\[17\] = 9"):
        ops.inner_update(t7, t7, torch.rand(5), seg)
