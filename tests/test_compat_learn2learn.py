"""fastmaml.compat.learn2learn: learn2learn 0.2's MAML / MetaSGD semantics, and a drop-in module.

Oracle tests (always): hand-written per-task loops with torch.autograd.grad(create_graph=True), float64,
whole-gradient relative error <= 1e-10. Comparisons with learn2learn itself (tests/compat_libs.py:
skipped where it is absent, failing instead under FASTMAML_REQUIRE_COMPAT_LIBS; installed by
tests/install_compat_libs.py): the meta-gradients of MAML and MetaSGD, and learn2learn's published
examples maml_sine.py and vision/maml_omniglot.py run with only the import swapped
(tests/compat_examples.py). Also: names passed through to learn2learn, the ImportError without it,
argument errors and the NaN refusal."""

from __future__ import annotations

import copy
import importlib.abc
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compat_examples as E
from compat_libs import library
from fastmaml.compat import learn2learn as fl2l
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-10
EXAMPLE_TOL = 1e-12


def rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


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


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("cls", ["MAML", "MetaSGD"])
@pytest.mark.parametrize("first_order", [False, True])
def test_same_meta_gradient_as_learn2learn(kind, cls, first_order):
    l2l = library("learn2learn")
    model, batch, loss = cases()[kind]

    def ours(m):
        return getattr(fl2l, cls)(m, lr=0.25, first_order=first_order)

    def theirs(m):
        return getattr(l2l.algorithms, cls)(m, lr=0.25, first_order=first_order)

    got = script(ours, copy.deepcopy(model), batch, 2, loss)
    want = script(theirs, copy.deepcopy(model), batch, 2, loss)
    assert rel(got, want) <= TOL


# -- the published examples, only the import swapped ---------------------------------------------------
def test_published_sine_example_same_as_learn2learn():
    """examples/maml_sine.py: 16 tasks, 5 adaptation steps, allow_unused=True, two Adam iterations."""
    l2l = library("learn2learn")
    theirs = E.run(E.L2LSine, l2l, iterations=2)
    ours = E.run(E.L2LSine, fl2l, iterations=2)
    diffs = E.differences(ours, theirs)
    assert max(diffs.values()) <= EXAMPLE_TOL, diffs


@pytest.mark.parametrize("model", ["fc", "cnn"])
def test_published_omniglot_example_same_as_learn2learn(model):
    """examples/vision/maml_omniglot.py with l2l.vision.models.OmniglotFC (the published line) or
    OmniglotCNN, tasks from l2l.data over random images: two iterations of 4 training + 4 validation
    clones, then the meta-test loop; every gradient, loss, accuracy, parameter and running statistic."""
    l2l = library("learn2learn")
    theirs = E.run(E.L2LOmniglot, l2l, iterations=2, tasks=4, model=model)
    ours = E.run(E.L2LOmniglot, fl2l, iterations=2, tasks=4, model=model)
    diffs = E.differences(ours, theirs)
    assert max(diffs.values()) <= EXAMPLE_TOL, diffs


# -- a drop-in module ----------------------------------------------------------------------------------
def test_other_names_are_learn2learn_s():
    l2l = library("learn2learn")
    for name in ("vision", "data", "nn", "utils", "optim", "gym", "text", "clone_module", "update_module",
                 "detach_module", "magic_box"):
        assert getattr(fl2l, name) is getattr(l2l, name), name
    assert fl2l.vision.models.OmniglotCNN is l2l.vision.models.OmniglotCNN
    assert fl2l.data.TaskDataset is l2l.data.TaskDataset
    assert fl2l.algorithms.GBML is l2l.algorithms.GBML and fl2l.algorithms.maml_update is l2l.algorithms.maml_update
    assert fl2l.algorithms.MAML is fl2l.MAML is not l2l.algorithms.MAML
    assert fl2l.algorithms.MetaSGD is fl2l.MetaSGD is not l2l.algorithms.MetaSGD
    from fastmaml.compat.learn2learn import vision  # noqa: F401  (from-imports go through the same lookup)
    assert vision is l2l.vision
    assert {"vision", "MAML", "clone_module"} <= set(dir(fl2l)) and {"GBML", "MAML"} <= set(dir(fl2l.algorithms))
    with pytest.raises(AttributeError, match=r"no attribute 'no_such_name'.*nor the installed learn2learn"):
        fl2l.no_such_name
    with pytest.raises(AttributeError):
        fl2l.__path__   # not a package: import machinery and tools must see an AttributeError


def test_without_learn2learn_other_names_raise_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)   # as if not installed
    with pytest.raises(ImportError, match=r"fastmaml\.compat\.learn2learn\.vision comes from learn2learn, which is "
                                          r"not installed \(pip install learn2learn.*MAML, MetaSGD"):
        fl2l.vision
    with pytest.raises(ImportError, match=r"learn2learn\.algorithms\.GBML comes from learn2learn, which is not"):
        fl2l.algorithms.GBML
    # fastmaml's own names keep working
    model, batch, loss = cases()["mlp"]
    got = script(lambda m: fl2l.algorithms.MAML(m, lr=0.25), copy.deepcopy(model), batch, 1, loss)
    want = oracle(copy.deepcopy(model), batch, 1, loss, 0.25)
    assert rel(got, want) <= TOL


class _BrokenImport(importlib.abc.MetaPathFinder):
    """learn2learn installed but failing to import (as with a torchvision built for another torch)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "learn2learn":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_a_failing_learn2learn_import_is_reported_as_such(monkeypatch):
    monkeypatch.delitem(sys.modules, "learn2learn", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport()] + sys.meta_path)
    with pytest.raises(ImportError, match=r"learn2learn\.data comes from learn2learn, whose import failed: "
                                          r"RuntimeError: operator torchvision::nms does not exist"):
        fl2l.data


def test_bad_arguments_are_named():
    model = mlp(1, 3, 1)
    with pytest.raises(TypeError, match=r"learn2learn\.MAML: lr must be a number \(e\.g\. 0\.01\) or a floating-point "
                                        r"tensor, got '0\.01' \(str\)"):
        fl2l.MAML(model, lr="0.01")
    with pytest.raises(ValueError, match=r"MAML: lr must be finite, got nan"):
        fl2l.MAML(model, lr=float("nan"))
    with pytest.raises(TypeError, match=r"MAML: first_order must be True or False, got 'False' \(str\)"):
        fl2l.MAML(model, lr=0.1, first_order="False")
    with pytest.raises(TypeError, match=r"MAML: allow_unused must be True, False or None, got 1"):
        fl2l.MAML(model, lr=0.1, allow_unused=1)
    with pytest.raises(TypeError, match=r"MAML: model must be a torch\.nn\.Module, got list"):
        fl2l.MAML(list(model.parameters()), lr=0.1)
    with pytest.raises(TypeError, match=r"MetaSGD: lr must be a number"):
        fl2l.MetaSGD(model, lr=[0.1])
    with pytest.raises(TypeError, match=r"MetaSGD: lrs must be None or one tensor per parameter of the model \(6\), "
                                        r"got 2 items"):
        fl2l.MetaSGD(model, lr=0.1, lrs=[torch.ones(1), torch.ones(1)])
    learner = fl2l.MAML(model, lr=0.1).clone()
    with pytest.raises(TypeError, match=r"adapt\(\): first_order must be True or False, got 'yes'"):
        learner.adapt(learner(torch.randn(2, 1)).sum(), first_order="yes")
    # a learnable rate (a tensor) is accepted, as in learn2learn
    fl2l.MAML(model, lr=torch.tensor(0.1, requires_grad=True))


@pytest.mark.parametrize("cls", ["MAML", "MetaSGD"])
def test_nan_inner_loss_is_refused_naming_the_call(cls):
    torch.manual_seed(2)
    model = mlp(1, 4, 1).double()
    maml = getattr(fl2l, cls)(model, lr=0.1)
    opt = torch.optim.SGD(maml.parameters(), lr=0.01)
    x = torch.randn(5, 1, dtype=torch.float64)
    for _ in range(2):                         # tasks 1 and 2 of this meta-batch adapt fine
        learner = maml.clone()
        learner.adapt(learner(x).pow(2).mean())
    learner = maml.clone()                     # task 3: its second adapt() gets a NaN loss
    learner.adapt(learner(x).pow(2).mean())
    fast = list(learner.parameters())
    with pytest.raises(FloatingPointError, match=r"non-finite inner loss nan given to adapt\(\) call 2 of clone #3 "
                                                 r"\(clone\(\) call 3 since the meta-parameters last changed\); "
                                                 r"learn2learn would .* NaN"):
        learner.adapt(learner(x).pow(2).mean() * float("nan"))
    assert all(a is b for a, b in zip(learner.parameters(), fast))   # nothing was updated
    assert all(p.grad is None for p in model.parameters())
    # an optimizer step changes the meta-parameters: the next clone is task 1 of the next meta-batch
    maml(x).pow(2).mean().backward()
    opt.step()
    learner = maml.clone()
    with pytest.raises(FloatingPointError, match=r"inner loss inf given to adapt\(\) call 1 of clone #1 "):
        learner.adapt(learner(x).pow(2).mean() * float("inf"))
    with pytest.raises(FloatingPointError, match=rf"adapt\(\) call 1 on the {cls} itself"):
        maml.adapt(maml(x).pow(2).mean() * float("nan"))
