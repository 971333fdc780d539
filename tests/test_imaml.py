"""iMAML (Rajeswaran et al. 2019): the batched CG's implicit meta-gradient against a dense linear
solve per task in float64 (adapted and non-adapted parameters), the proximal inner loop against a
per-task loop, the CG vector kernels against their reference, and bad settings."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastmaml.algorithms import IMAML
from fastmaml.algorithms.imaml import batched_cg
from fastmaml.kernels import cg as cg_kernels
from fastmaml.models import mlp_bn


def _data(T=3, ways=3, n=4, q=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, ways * n, d, generator=g, dtype=torch.float64)
    qx = torch.randn(T, ways * q, d, generator=g, dtype=torch.float64)
    sy = torch.randint(0, ways, (T, ways * n), generator=g)
    qy = torch.randint(0, ways, (T, ways * q), generator=g)
    return sx, sy, qx, qy


def _model():
    torch.manual_seed(0)
    return mlp_bn(3, (7, 5), in_features=6).double()


@pytest.mark.parametrize("cg_kernels,batching", [("auto", "auto"), ("torch", "vmap")])  # fused / generic HVP
def test_implicit_gradient_equals_dense_solve(cg_kernels, batching):
    model = _model()
    sx, sy, qx, qy = _data(T=2)
    lam, T = 2.0, sx.shape[0]
    learner = IMAML(model, inner_lr=0.25, inner_steps=4, lam=lam, cg_steps=200, cg_tol=1e-14,
                    cg_kernels=cg_kernels, batching=batching)
    assert learner.execution_path.startswith("fused" if batching == "auto" else "generic")
    adapted = list(learner.adapted_names)
    params = dict(model.named_parameters())
    shared = [n for n in params if n not in adapted]
    assert shared  # BatchNorm's affine parameters: not adapted, meta-learned through the solve
    theta = torch.cat([params[n].detach().flatten() for n in adapted])
    phi = learner.adapt(sx, sy).flat
    learner.meta_step(sx, sy, qx, qy)
    assert bool(learner.last_cg.converged.all())

    shapes = [params[n].shape for n in adapted]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(adapted, shapes):
            out[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    # the proximal inner loop, task by task
    for t in range(T):
        w = theta.clone()
        for _ in range(4):
            w = w.requires_grad_(True)
            loss = F.cross_entropy(functional_call(model, unflat(w), (sx[t],)), sy[t])
            (g,) = torch.autograd.grad(loss, w)
            w = (w - 0.25 * (g + lam * (w - theta))).detach()
        assert torch.allclose(w, phi[t], rtol=0, atol=1e-13)

    want_theta = torch.zeros_like(theta)
    want_shared = {n: torch.zeros_like(params[n]) for n in shared}
    for t in range(T):
        p_t = phi[t].detach()
        ls = lambda w: F.cross_entropy(functional_call(model, unflat(w), (sx[t],)), sy[t])
        H = torch.autograd.functional.hessian(ls, p_t, vectorize=True)
        wq = p_t.clone().requires_grad_(True)
        lq = F.cross_entropy(functional_call(model, unflat(wq), (qx[t],)), qy[t]) / T
        gq_all = torch.autograd.grad(lq, [wq] + [params[n] for n in shared])
        A = torch.eye(H.shape[0], dtype=H.dtype) + H / lam
        x = torch.linalg.solve(A, gq_all[0])
        want_theta += x
        ws = p_t.clone().requires_grad_(True)
        (gs,) = torch.autograd.grad(ls(ws), ws, create_graph=True)
        cross = torch.autograd.grad((gs * x).sum(), [params[n] for n in shared])
        for n, a, c in zip(shared, gq_all[1:], cross):
            want_shared[n] += a - c / lam
    got = torch.cat([params[n].grad.flatten() for n in adapted] + [params[n].grad.flatten() for n in shared])
    want = torch.cat([want_theta] + [want_shared[n].flatten() for n in shared])
    assert float((got - want).norm() / want.norm()) < 1e-10


def test_batched_cg_per_task_masks():
    g = torch.Generator().manual_seed(3)
    T, P = 4, 13
    mats = []
    for t in range(T):
        q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
        eig = torch.ones(P, dtype=torch.float64) if t == 0 else torch.logspace(0, t, P, dtype=torch.float64)
        mats.append(q @ torch.diag(eig) @ q.T)
    A = torch.stack(mats)
    b = torch.randn(T, P, generator=g, dtype=torch.float64)
    b[2] = 0.0  # a task with nothing to solve stops at once
    x, info = batched_cg(lambda p: torch.einsum("tij,tj->ti", A, p), b, 60, 1e-12)
    want = torch.linalg.solve(A, b)
    assert torch.allclose(x, want, atol=1e-9, rtol=0)
    it = info.iterations.tolist()
    assert it[0] == 1 and it[2] == 0 and it[3] > it[1] > 1, it  # A_0 = I: one step; harder ones take more
    assert bool(info.converged.all())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_cg_kernels_match_reference(dtype, tol):
    g = torch.Generator().manual_seed(5)
    T, P = 5, 1031  # odd P
    x, r, p, ap = (torch.randn(T, P, generator=g).to(dtype) for _ in range(4))
    alpha = torch.randn(T, generator=g).to(dtype)
    alpha[1] = 0.0  # a converged task
    want = cg_kernels.cg_step(x, r, p, ap, alpha, backend="torch")
    backends = ("auto",) + (("cpp",) if cg_kernels.cg_backend(x) == "cpp" else ())
    try:
        import fastmaml.triton.cg_ops  # noqa: F401

        if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
            backends += ("triton",)
    except ImportError:
        pass
    if torch.cuda.is_available():
        x, r, p, ap, alpha = (t.cuda() for t in (x, r, p, ap, alpha))
        want = tuple(w.cuda() for w in want)
    for backend in backends:
        got = cg_kernels.cg_step(x, r, p, ap, alpha, backend=backend)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=tol, atol=tol)
        assert torch.equal(got[0][1], x[1]) and torch.equal(got[1][1], r[1])
        d = cg_kernels.cg_direction(r, p, alpha, backend=backend)
        assert torch.allclose(d, r + alpha[:, None] * p, rtol=tol, atol=tol)
    # the registered ops: schema, fake kernels
    torch.library.opcheck(torch.ops.fastmaml_cg.cg_step.default, (x, r, p, ap, alpha))
    torch.library.opcheck(torch.ops.fastmaml_cg.cg_direction.default, (r, p, alpha))


def test_cg_schemas_match_the_extension():
    cg_kernels.cg_backend(torch.zeros(1, 1))
    for name, schema in cg_kernels.CG_SCHEMAS.items():
        assert str(getattr(torch.ops.fastmaml_cg, name).default._schema) == "fastmaml_cg::" + schema


def test_bad_settings():
    model = _model()
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam .* must be a finite number > 0"):
            IMAML(model, lam=lam)
    with pytest.raises(ValueError, match="cg_steps .* must be an int >= 1"):
        IMAML(model, cg_steps=0)
    with pytest.raises(ValueError, match="cg_tol"):
        IMAML(model, cg_tol=-1.0)
    with pytest.raises(ValueError, match="CG iterations"):
        batched_cg(lambda p: p, torch.ones(1, 2), 0, 0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        cg_kernels.cg_step(*(torch.zeros(2, 3),) * 4, torch.zeros(3))


def test_memory_does_not_depend_on_the_inner_steps(monkeypatch):
    """Only phi_K and one HVP state are kept: every inner step's support gradient is taken without a
    graph, and exactly one state (at phi_K) is made, whatever K."""
    model = _model()
    sx, sy, qx, qy = _data()
    for K in (1, 6):
        learner = IMAML(model, inner_lr=0.25, inner_steps=K, lam=2.0, cg_steps=3)
        calls = []
        orig = learner.engine.support_grad

        def spy(theta, x, y, loss_fn, create_graph, _orig=orig):
            calls.append(create_graph)
            return _orig(theta, x, y, loss_fn, create_graph)

        monkeypatch.setattr(learner.engine, "support_grad", spy)
        learner.meta_step(sx, sy, qx, qy)
        assert calls == [False] * K + [True]
