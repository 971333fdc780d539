"""fastmaml.compat.learn2learn: learn2learn 0.2's MAML / MetaSGD semantics.

Oracle tests (always): hand-written per-task loops with torch.autograd.grad(create_graph=True), float64,
whole-gradient relative error <= 1e-10. Comparison with learn2learn itself: only where it imports
(it needs the sdist build: bench/setup_bench_env.sh), otherwise skipped with the reason."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.compat import learn2learn as fl2l
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-10


def rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


def _import_l2l():
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
        from baselines import import_learn2learn
        return import_learn2learn(), ""
    except Exception as e:  # noqa: BLE001
        return None, f"learn2learn is not importable here ({type(e).__name__}: {e}); install it with bench/setup_bench_env.sh"
    finally:
        sys.path.pop(0)


def script(make, model, batch, steps, loss, fo=None, tasks=None):
    """The learn2learn example's meta-step: per task clone / adapt K times / query loss; mean backward."""
    maml = make(model)
    sx, sy, qx, qy = batch
    T = sx.shape[0] if tasks is None else tasks
    total = 0.0
    for t in range(T):
        learner = maml.clone() if fo is None else maml.clone(first_order=fo)
        for _ in range(steps):
            learner.adapt(loss(learner(sx[t]), sy[t]))
        total = total + loss(learner(qx[t]), qy[t])
    (total / T).backward()
    return [p.grad.clone() for p in maml.parameters()]


def oracle(model, batch, steps, loss, lr, first_order=False, lrs=None):
    """Hand-unrolled: per task, p <- p - lr * dL/dp (every parameter), query loss, mean; autograd."""
    params = list(model.parameters())
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        fast = list(params)
        for _ in range(steps):
            names = dict(zip([n for n, _ in model.named_parameters()], fast))
            l = loss(torch.func.functional_call(model, names, (sx[t],)), sy[t])
            gs = torch.autograd.grad(l, fast, create_graph=not first_order)
            rates = lrs if lrs is not None else [lr] * len(fast)
            fast = [p - r * g for p, r, g in zip(fast, rates, gs)]
        names = dict(zip([n for n, _ in model.named_parameters()], fast))
        total = total + loss(torch.func.functional_call(model, names, (qx[t],)), qy[t])
    wrt = params + (list(lrs) if lrs is not None else [])
    return list(torch.autograd.grad(total / sx.shape[0], wrt))


def cases():
    torch.manual_seed(0)
    return {
        "mlp": (mlp(1, 6, 1).double(), regression_batch(3, seed=1), F.mse_loss),
        "conv_bn": (conv_bn(hidden=3).double(), classification_batch(3, seed=2), F.cross_entropy),
    }


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_maml_equals_oracle(kind, steps, first_order):
    model, batch, loss = cases()[kind]
    got = script(lambda m: fl2l.MAML(m, lr=0.25, first_order=first_order), copy.deepcopy(model), batch, steps, loss)
    want = oracle(copy.deepcopy(model), batch, steps, loss, 0.25, first_order)
    assert rel(got, want) <= TOL


def test_metasgd_equals_oracle_and_learns_rates():
    model, batch, loss = cases()["mlp"]
    meta = fl2l.MetaSGD(copy.deepcopy(model), lr=0.25)
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))
    got = script(lambda m: meta, None, batch, 2, loss)
    ref = copy.deepcopy(model)
    lrs = [torch.full_like(p, 0.25, requires_grad=True) for p in ref.parameters()]
    want = oracle(ref, batch, 2, loss, None, lrs=lrs)
    assert rel(got, want) <= TOL


def test_api_surface():
    model = mlp(1, 4, 1).double()
    maml = fl2l.algorithms.MAML(model, lr=0.5)
    assert maml.module is model
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]
    assert maml.allow_unused is False and maml.lr == 0.5
    x = torch.randn(5, 1, dtype=torch.float64)
    learner = maml.clone()
    assert torch.equal(learner(x), model(x))
    learner.adapt(learner(x).pow(2).mean())
    assert all(not (a is b) for a, b in zip(learner.parameters(), model.parameters()))
    assert learner.module is model
    # clone of a clone starts at the adapted weights; the model's own weights are untouched
    again = learner.clone()
    assert torch.equal(again(x), learner(x))
    assert not torch.equal(learner(x), model(x))
    # adapting the meta-learner itself
    m2 = fl2l.MAML(copy.deepcopy(model), lr=0.5)
    m2.adapt(m2(x).pow(2).mean())
    assert torch.allclose(m2(x), learner(x), atol=1e-14, rtol=0)


def test_allow_nograd_and_unused():
    torch.manual_seed(1)
    model = mlp(1, 4, 1).double()
    model[0].bias.requires_grad_(False)
    x = torch.randn(5, 1, dtype=torch.float64)
    learner = fl2l.MAML(model, lr=0.5).clone()
    with pytest.raises(RuntimeError):
        learner.adapt(learner(x).pow(2).mean())
    learner = fl2l.MAML(model, lr=0.5, allow_nograd=True).clone()
    learner.adapt(learner(x).pow(2).mean())
    assert list(learner.parameters())[1] is model[0].bias
    unused = nn.ModuleDict({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}).double()

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = unused

        def forward(self, z):
            return self.m["a"](z)

    p = fl2l.MAML(Partial(), lr=0.5, allow_unused=True).clone()
    p.adapt(p(x).pow(2).mean())
    assert list(p.parameters())[2] is unused["b"].weight


L2L, WHY = _import_l2l()


@pytest.mark.skipif(L2L is None, reason=WHY or "learn2learn missing")
@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("cls", ["MAML", "MetaSGD"])
@pytest.mark.parametrize("first_order", [False, True])
def test_same_meta_gradient_as_learn2learn(kind, cls, first_order):
    model, batch, loss = cases()[kind]

    def ours(m):
        return getattr(fl2l, cls)(m, lr=0.25, first_order=first_order)

    def theirs(m):
        return getattr(L2L.algorithms, cls)(m, lr=0.25, first_order=first_order)

    got = script(ours, copy.deepcopy(model), batch, 2, loss)
    want = script(theirs, copy.deepcopy(model), batch, 2, loss)
    assert rel(got, want) <= TOL
