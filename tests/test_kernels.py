"""Every kernel backend available here against the reference ops, plus autograd and opcheck.

Backends: torch (always), cpp (when fastmaml._C is built), triton (CPU under TRITON_INTERPRET=1, set
by conftest), cuda (when a GPU and the CUDA build are present).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fastmaml.kernels as K
from fastmaml.kernels.schemas import SCHEMAS
from fastmaml.kernels import flat_torch as ref

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _backends():
    out = []
    for name, status in K.available_backends().items():
        if status != "available":
            continue
        device = "cuda" if name == "cuda" else ("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
        out.append((name, device))
    return out


BACKENDS = _backends()
LR_FORMS = ["scalar", "segment", "element"]


def _lr(form, T, P, dtype, device, g):
    if form == "scalar":
        return torch.rand((), generator=g, dtype=dtype).to(device) + 0.1, None
    if form == "element":
        return torch.rand(P, generator=g, dtype=dtype).to(device) + 0.1, None
    sizes = [P // 3, P // 3, P - 2 * (P // 3)]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)).to(device)
    return torch.rand(3, generator=g, dtype=dtype).to(device) + 0.1, seg


def _randn(shape, dtype, device, g):
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


@pytest.fixture
def backend(request):
    name, _ = request.param
    K.set_backend(name)
    yield request.param
    K.set_backend("auto")


@pytest.mark.parametrize("backend", BACKENDS, ids=[b for b, _ in BACKENDS], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,P", [(1, 1001), (7, 1001), (7, 37)])
@pytest.mark.parametrize("form", LR_FORMS)
def test_ops_match_reference(backend, dtype, T, P, form):
    _, device = backend
    g = torch.Generator().manual_seed(hash((T, P, form, str(dtype))) % 2**31)
    lr, seg = _lr(form, T, P, dtype, device, g)
    theta2, theta1 = _randn((T, P), dtype, device, g), _randn((P,), dtype, device, g)
    grad2, grad1 = _randn((T, P), dtype, device, g), _randn((P,), dtype, device, g)
    v, hv, gg, gq = (_randn((T, P), dtype, device, g) for _ in range(4))
    tol = TOL[dtype]
    for th, gr in ((theta2, grad2), (theta1, grad2), (theta2, grad1), (theta1, grad1)):
        torch.testing.assert_close(K.inner_update(th, gr, lr, seg), ref.inner_update(th, gr, lr, seg), **tol)
    torch.testing.assert_close(K.scale(v, lr, seg), ref.scale(v, lr, seg), **tol)
    torch.testing.assert_close(K.scale(theta1, lr, seg), ref.scale(theta1, lr, seg), **tol)
    # A sum over T*P products: float32 rounding grows with the count.
    red = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else tol
    torch.testing.assert_close(K.segment_dot(v, gg, lr, seg), ref.segment_dot(v, gg, lr, seg), **red)
    for h, q, w in ((hv, gq, 0.37), (None, gq, 1.5), (hv, None, 0.0), (None, None, 2.0)):
        out, dlr = K.reverse_step(v, h, gg, q, w, lr, seg)
        rout, rdlr = ref.reverse_step(v, h, gg, q, w, lr, seg)
        torch.testing.assert_close(out, rout, **tol)
        torch.testing.assert_close(dlr, rdlr, **red)
        assert out.data_ptr() != v.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS, ids=[b for b, _ in BACKENDS], indirect=True)
@pytest.mark.parametrize("form", LR_FORMS)
def test_gradcheck_and_gradgradcheck(backend, form):
    _, device = backend
    g = torch.Generator().manual_seed(1)
    T, P = 3, 13
    lr, seg = _lr(form, T, P, torch.float64, device, g)
    lr.requires_grad_(True)
    theta = _randn((P,), torch.float64, device, g).requires_grad_(True)
    grad = _randn((T, P), torch.float64, device, g).requires_grad_(True)
    assert gradcheck(lambda a, b, c: K.inner_update(a, b, c, seg), (theta, grad, lr))
    assert gradgradcheck(lambda a, b, c: K.inner_update(a, b, c, seg), (theta, grad, lr))
    v = _randn((T, P), torch.float64, device, g).requires_grad_(True)
    assert gradcheck(lambda a, c: K.scale(a, c, seg), (v, lr))
    assert gradgradcheck(lambda a, c: K.scale(a, c, seg), (v, lr))
    assert gradcheck(lambda a, b: K.segment_dot(a, b, lr, seg), (v, grad))
    hv, gq = (_randn((T, P), torch.float64, device, g).requires_grad_(True) for _ in range(2))
    assert gradcheck(lambda *a: K.reverse_step(a[0], a[1], a[2], a[3], 0.7, lr, seg), (v, hv, grad, gq))


def _opcheck_ns(name):
    if name == "torch":
        pytest.skip("the torch backend is plain PyTorch, not a registered op")
    return torch.ops.fastmaml_triton if name == "triton" else torch.ops.fastmaml


@pytest.mark.parametrize("backend", BACKENDS, ids=[b for b, _ in BACKENDS], indirect=True)
@pytest.mark.parametrize("form", LR_FORMS)
def test_opcheck(backend, form):
    name, device = backend
    ns = _opcheck_ns(name)
    g = torch.Generator().manual_seed(2)
    T, P = 3, 17
    lr, seg = _lr(form, T, P, torch.float64, device, g)
    lr.requires_grad_(True)
    th = _randn((P,), torch.float64, device, g).requires_grad_(True)
    a, b, c, d = (_randn((T, P), torch.float64, device, g).requires_grad_(True) for _ in range(4))
    opcheck(ns.inner_update.default, (th, a, lr, seg))
    opcheck(ns.inner_update.default, (a, b, lr, seg))
    opcheck(ns.scale.default, (a, lr, seg))
    opcheck(ns.segment_dot.default, (a, b, lr, seg))
    opcheck(ns.reverse_step.default, (a, b, c, d, 0.5, lr, seg))
    opcheck(ns.reverse_step.default, (a, None, c, None, 0.0, lr, seg))


def test_schemas_agree_with_the_registered_ops():
    K.probe("cpp")
    for name, schema in SCHEMAS.items():
        registered = str(getattr(torch.ops.fastmaml, name).default._schema)
        assert registered == "fastmaml::" + schema


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, ids=[b for b, _ in BACKENDS], indirect=True)
def test_bad_inputs_raise_clear_errors(backend):
    _, device = backend
    f = dict(device=device, dtype=torch.float32)
    theta, grad = torch.randn(7, 11, **f), torch.randn(7, 11, **f)
    seg = torch.tensor([0] * 5 + [1] * 6, device=device)
    lr2 = torch.rand(2, **f)
    with pytest.raises(ValueError, match=r"grad must have shape \[T, 11\] or \[11\], got \[7, 10\]"):
        K.inner_update(theta, torch.randn(7, 10, **f), lr2, seg)
    with pytest.raises(ValueError, match=r"grad has 5 tasks .* but theta has 7"):
        K.inner_update(theta, torch.randn(5, 11, **f), lr2, seg)
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 2\) .* got ids in \[0, 2\]"):
        K.inner_update(theta, grad, lr2, seg + (seg == 1).long())
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 2\) .* got ids in \[-1, 1\]"):
        K.inner_update(theta, grad, lr2, seg - (seg == 0).long())
    with pytest.raises(ValueError, match=r"without segments is per element and must have shape \[11\]"):
        K.inner_update(theta, grad, lr2, None)
    with pytest.raises(ValueError, match=r"lr must be 0-d"):
        K.scale(theta, torch.rand(2, 2, **f), seg)
    with pytest.raises(ValueError, match=r"segments must have shape \[11\], got \[10\]"):
        K.scale(theta, lr2, seg[:10])
    with pytest.raises(TypeError, match=r"segments must be an int64 tensor, got torch.int32"):
        K.scale(theta, lr2, seg.int())
    with pytest.raises(TypeError, match=r"theta must be a floating-point tensor"):
        K.inner_update(theta.long(), grad.long(), lr2.long(), seg)
    with pytest.raises(TypeError, match=r"grad must have dtype torch.float32 .* got torch.float64"):
        K.inner_update(theta, grad.double(), lr2, seg)
    with pytest.raises(ValueError, match=r"hv must have shape \[T, 11\], got \[11\]"):
        K.reverse_step(theta, grad[0], grad, None, 1.0, lr2, seg)
    with pytest.raises(ValueError, match=r"a and b must have one shape"):
        K.segment_dot(theta, grad[0], lr2, seg)


def test_bad_inputs_on_mixed_devices_name_the_argument():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mix devices")
    theta = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"grad is on cuda"):
        K.inner_update(theta, theta.cuda(), torch.tensor(0.1))


def test_backend_selection_errors():
    with pytest.raises(ValueError, match=r"unknown kernel backend 'fast'; expected one of auto, torch, cpp, cuda, triton"):
        K.set_backend("fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: "):
            K.set_backend("cuda")
    K.set_backend("torch")
    try:
        assert K.get_backend() == "torch"
    finally:
        K.set_backend("auto")


# -- installs without the optional pieces ----------------------------------------------------------

def _run_isolated(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env)


def test_import_and_reference_path_without_extension_or_triton():
    code = """
        import sys, builtins
        real_import = builtins.__import__
        def no_triton(name, *a, **k):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton hidden by the test")
            return real_import(name, *a, **k)
        builtins.__import__ = no_triton
        import torch, fastmaml
        from torch import nn
        import fastmaml.kernels as K
        av = K.available_backends()
        assert av["torch"] == "available", av
        assert "FASTMAML_NO_EXT=1" in av["cpp"], av
        assert "triton" in av["triton"] and av["triton"] != "available", av
        try:
            K.set_backend("cpp")
        except RuntimeError as e:
            assert "FASTMAML_NO_EXT=1" in str(e)
        else:
            raise AssertionError("set_backend('cpp') should fail")
        m = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
        x = torch.randn(3, 4, 1)
        out = fastmaml.MAML(m, inner_lr=0.1).meta_step(x, x.sin(), x, x.sin())
        assert torch.isfinite(out.loss)
        print("ok")
    """
    r = _run_isolated(code, FASTMAML_NO_EXT="1")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
