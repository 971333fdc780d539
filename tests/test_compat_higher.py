"""fastmaml.compat.higher: higher 0.2.1's innerloop_ctx for torch.optim.SGD.

Oracle tests (always): a hand-written unrolled SGD (momentum, dampening, nesterov, weight decay) with
torch.autograd.grad(create_graph=True), float64, relative error <= 1e-10. Comparison with higher
itself where it imports (skipped with the reason otherwise)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastmaml.compat import higher as fhigher
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-10

try:
    import higher as HIGHER
    WHY = ""
except Exception as e:  # noqa: BLE001
    HIGHER, WHY = None, f"higher is not importable here ({type(e).__name__}: {e}); pip install higher==0.2.1"


def rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


SGD_SETTINGS = {
    "plain": dict(lr=0.25),
    "momentum": dict(lr=0.125, momentum=0.875, dampening=0.25),
    "nesterov+wd": dict(lr=0.125, momentum=0.5, nesterov=True, weight_decay=0.0625),
}


def script(lib, model, batch, steps, loss, sgd, copy_initial_weights=False):
    """higher's maml-omniglot meta-step: per task innerloop_ctx, K diffopt steps, query loss backward."""
    sx, sy, qx, qy = batch
    inner = torch.optim.SGD(model.parameters(), **sgd)
    model.zero_grad()
    init = []
    for t in range(sx.shape[0]):
        with lib.innerloop_ctx(model, inner, copy_initial_weights=copy_initial_weights) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fnet(sx[t]), sy[t]))
            (loss(fnet(qx[t]), qy[t]) / sx.shape[0]).backward()
            if copy_initial_weights:
                init.append([p.grad for p in fnet.parameters(time=0)])
    if copy_initial_weights:
        return [sum(gs) for gs in zip(*init)]
    return [p.grad.clone() for p in model.parameters()]


def oracle(model, batch, steps, loss, sgd):
    lr, mom = sgd["lr"], sgd.get("momentum", 0.0)
    damp, nest, wd = sgd.get("dampening", 0.0), sgd.get("nesterov", False), sgd.get("weight_decay", 0.0)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        fast, bufs = [p.clone() for p in params], [None] * len(params)
        for _ in range(steps):
            l = loss(torch.func.functional_call(model, dict(zip(names, fast)), (sx[t],)), sy[t])
            gs = torch.autograd.grad(l, fast, create_graph=True)
            new = []
            for i, (p, g) in enumerate(zip(fast, gs)):
                if wd:
                    g = g + wd * p
                if mom:
                    bufs[i] = g if bufs[i] is None else bufs[i] * mom + (1 - damp) * g
                    g = g + mom * bufs[i] if nest else bufs[i]
                new.append(p - lr * g)
            fast = new
        total = total + loss(torch.func.functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t])
    return list(torch.autograd.grad(total / sx.shape[0], params))


def cases():
    torch.manual_seed(0)
    return {
        "mlp": (mlp(1, 6, 1).double(), regression_batch(3, seed=1), F.mse_loss),
        "conv_bn": (conv_bn(hidden=3).double(), classification_batch(3, seed=2), F.cross_entropy),
    }


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_equals_oracle(kind, setting):
    model, batch, loss = cases()[kind]
    sgd = SGD_SETTINGS[setting]
    got = script(fhigher, copy.deepcopy(model), batch, 2, loss, sgd)
    want = oracle(copy.deepcopy(model), batch, 2, loss, sgd)
    assert rel(got, want) <= TOL


def test_copy_initial_weights_stops_gradients_at_the_copies():
    model, batch, loss = cases()["mlp"]
    m = copy.deepcopy(model)
    got = script(fhigher, m, batch, 2, loss, SGD_SETTINGS["plain"], copy_initial_weights=True)
    assert all(p.grad is None for p in m.parameters())
    want = oracle(copy.deepcopy(model), batch, 2, loss, SGD_SETTINGS["plain"])
    assert rel(got, want) <= TOL


def test_other_optimizers_are_refused_by_name():
    model = mlp(1, 3, 1)
    with pytest.raises(NotImplementedError, match=r"supports torch\.optim\.SGD.*got torch\.optim\.adam\.Adam"):
        with fhigher.innerloop_ctx(model, torch.optim.Adam(model.parameters())):
            pass
    with pytest.raises(NotImplementedError, match="maximize"):
        with fhigher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)):
            pass


def test_track_higher_grads_false_and_buffers_are_copies():
    model = conv_bn(hidden=3).double()
    sx, sy, _, _ = classification_batch(1, seed=3)
    before = [b.clone() for b in model.buffers()]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with fhigher.innerloop_ctx(model, inner, track_higher_grads=False) as (fnet, diffopt):
        new = diffopt.step(F.cross_entropy(fnet(sx[0]), sy[0]))
        assert all(p.grad_fn is None and p.requires_grad for p in new)
        with pytest.raises(ValueError):
            list(fnet.parameters(time=1))
        assert not all(torch.equal(a, b) for a, b in zip(fnet.buffers(), before))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))


@pytest.mark.skipif(HIGHER is None, reason=WHY or "higher missing")
@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
@pytest.mark.parametrize("copy_initial_weights", [False, True])
def test_same_gradients_as_higher(kind, setting, copy_initial_weights):
    model, batch, loss = cases()[kind]
    sgd = SGD_SETTINGS[setting]
    got = script(fhigher, copy.deepcopy(model), batch, 2, loss, sgd, copy_initial_weights)
    want = script(HIGHER, copy.deepcopy(model), batch, 2, loss, sgd, copy_initial_weights)
    assert rel(got, want) <= TOL
