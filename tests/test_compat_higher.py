"""fastmaml.compat.higher: higher 0.2.1's innerloop_ctx for torch.optim.SGD, and a drop-in module.

Oracle tests (always): a hand-written unrolled SGD (momentum, dampening, nesterov, weight decay) with
torch.autograd.grad(create_graph=True), float64, relative error <= 1e-10. Comparisons with higher itself
(tests/compat_libs.py: skipped where it is absent, failing instead under FASTMAML_REQUIRE_COMPAT_LIBS):
the gradients for every SGD option, and higher's published examples/maml-omniglot.py run with only the
import swapped (tests/compat_examples.py). Also: names passed through to higher, the ImportError
without it, and the NaN refusal."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import compat_examples as E
from compat_libs import library
from fastmaml.compat import higher as fhigher
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-10
EXAMPLE_TOL = 1e-12


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


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
@pytest.mark.parametrize("copy_initial_weights", [False, True])
def test_same_gradients_as_higher(kind, setting, copy_initial_weights):
    higher = library("higher")
    model, batch, loss = cases()[kind]
    sgd = SGD_SETTINGS[setting]
    got = script(fhigher, copy.deepcopy(model), batch, 2, loss, sgd, copy_initial_weights)
    want = script(higher, copy.deepcopy(model), batch, 2, loss, sgd, copy_initial_weights)
    assert rel(got, want) <= TOL


def test_published_omniglot_example_same_as_higher():
    """higher's examples/maml-omniglot.py pattern, float64: one meta-iteration (2 tasks, 5 diffopt steps,
    backward per task, Adam) and the test loop (track_higher_grads=False); the original vs the import swap.
    16 channels instead of 64 keeps the float64 double backward of 100 images per task within seconds;
    every layer type (in-place ReLU, BatchNorm momentum 1, max-pool) is there."""
    higher = library("higher")
    theirs = E.run(E.HigherOmniglot, higher, iterations=1, tasks=2, channels=16)
    ours = E.run(E.HigherOmniglot, fhigher, iterations=1, tasks=2, channels=16)
    diffs = E.differences(ours, theirs)
    assert max(diffs.values()) <= EXAMPLE_TOL, diffs


def test_other_names_are_higher_s():
    higher = library("higher")
    for name in ("patch", "optim", "utils", "monkeypatch", "get_diff_optim", "create_diff_optim", "register_optim"):
        assert getattr(fhigher, name) is getattr(higher, name), name
    assert fhigher.optim.DifferentiableAdam is higher.optim.DifferentiableAdam
    assert fhigher.innerloop_ctx is not higher.innerloop_ctx
    assert {"patch", "innerloop_ctx"} <= set(dir(fhigher))
    with pytest.raises(AttributeError, match=r"no attribute 'no_such_name'.*nor the installed higher"):
        fhigher.no_such_name


def test_without_higher_other_names_raise_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "higher", None)   # as if not installed
    with pytest.raises(ImportError, match=r"fastmaml\.compat\.higher\.monkeypatch comes from higher, which is not "
                                          r"installed \(pip install higher==0\.2\.1\).*innerloop_ctx"):
        fhigher.monkeypatch
    model, batch, loss = cases()["mlp"]                # innerloop_ctx keeps working
    got = script(fhigher, copy.deepcopy(model), batch, 1, loss, SGD_SETTINGS["plain"])
    want = oracle(copy.deepcopy(model), batch, 1, loss, SGD_SETTINGS["plain"])
    assert rel(got, want) <= TOL


def test_nan_inner_loss_is_refused_naming_the_call():
    torch.manual_seed(4)
    model = mlp(1, 4, 1).double()
    x = torch.randn(5, 1, dtype=torch.float64)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with fhigher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fnet, diffopt):
        diffopt.step(fnet(x).pow(2).mean())
    with fhigher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fnet, diffopt):
        diffopt.step(fnet(x).pow(2).mean())
        before = list(fnet.parameters())
        with pytest.raises(FloatingPointError, match=r"non-finite inner loss nan given to diffopt\.step\(\) call 2 of "
                                                     r"innerloop_ctx #2 \(innerloop_ctx call 2 on this model since its "
                                                     r"parameters last changed\); higher would .* NaN"):
            diffopt.step(fnet(x).pow(2).mean() * float("nan"))
        assert all(a is b for a, b in zip(fnet.parameters(), before))   # nothing was updated
    with torch.no_grad():                              # the meta-parameters change: tasks count from 1 again
        for p in model.parameters():
            p.add_(0.01)
    with fhigher.innerloop_ctx(model, inner) as (fnet, diffopt):
        with pytest.raises(FloatingPointError, match=r"call 1 of innerloop_ctx #1 "):
            diffopt.step(fnet(x).pow(2).mean() * float("inf"))
