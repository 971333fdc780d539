"""fastmaml.compat.torchopt: TorchOpt 0.7.3's MetaSGD / extract_state_dict / recover_state_dict.

Oracle tests (always): a hand-written unrolled SGD per task (the update rule written out as math,
torch.autograd.grad(create_graph=True) + torch.func.functional_call), float64, relative error <= 1e-12.
Comparisons with TorchOpt itself (tests/compat_libs.py: skipped where it is absent, failing instead under
FASTMAML_REQUIRE_COMPAT_LIBS): the meta-gradients of the MAML pattern for every SGD option, what
extract_state_dict returns and what recover_state_dict restores, and TorchOpt's published Omniglot MAML
example run with only the import swapped (tests/compat_examples.py)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compat_examples as E
from compat_libs import library
from fastmaml.compat import torchopt as fto
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-12

SGD_SETTINGS = {
    "plain": dict(lr=0.25),
    "momentum+dampening": dict(lr=0.125, momentum=0.875, dampening=0.25),
    "nesterov+wd": dict(lr=0.125, momentum=0.5, nesterov=True, weight_decay=0.0625),
    "maximize+wd": dict(lr=0.03125, weight_decay=0.125, maximize=True),
    "momentum, moments without grad": dict(lr=0.125, momentum=0.5, moment_requires_grad=False),
}


def cases():
    torch.manual_seed(0)
    return {
        "mlp": (mlp(1, 6, 1).double(), regression_batch(3, seed=1), F.mse_loss),
        "conv_bn": (conv_bn(hidden=3).double(), classification_batch(3, seed=2), F.cross_entropy),
    }


def script(lib, model, batch, steps, loss, sgd):
    """TorchOpt's MAML pattern: MetaSGD over the module, state extracted once, recovered after each task,
    the mean of the stacked query losses backpropagated."""
    sx, sy, qx, qy = batch
    inner_opt = lib.MetaSGD(model, **sgd)
    net_state = lib.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = lib.extract_state_dict(inner_opt, by="reference")
    losses = []
    for t in range(sx.shape[0]):
        for _ in range(steps):
            inner_opt.step(loss(model(sx[t]), sy[t]))
        losses.append(loss(model(qx[t]), qy[t]))
        lib.recover_state_dict(model, net_state)
        lib.recover_state_dict(inner_opt, opt_state)
    torch.mean(torch.stack(losses)).backward()
    return [p.grad.clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def oracle(model, batch, steps, loss, sgd):
    """Per task, K steps of d = (+-g + wd p) -> trace m -> p - lr d, unrolled with autograd. TorchOpt's
    trace adds the first gradient it ever sees undampened and dampens every later one, for every task."""
    lr, mom, damp = sgd["lr"], sgd.get("momentum", 0.0), sgd.get("dampening", 0.0)
    wd, nest, maximize = sgd.get("weight_decay", 0.0), sgd.get("nesterov", False), sgd.get("maximize", False)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sx, sy, qx, qy = batch
    first_update_ever = True
    total = 0.0
    for t in range(sx.shape[0]):
        fast = list(params)
        m = [torch.zeros_like(p) for p in params]
        for _ in range(steps):
            gs = torch.autograd.grad(loss(torch.func.functional_call(model, dict(zip(names, fast)), (sx[t],)), sy[t]),
                                     fast, create_graph=True)
            new = []
            for i, (p, g) in enumerate(zip(fast, gs)):
                d = (-g if maximize else g) + wd * p
                if mom:
                    m[i] = d if first_update_ever else mom * m[i] + (1 - damp) * d
                    d = d + mom * m[i] if nest else m[i]
                new.append(p - lr * d)
            first_update_ever = False if mom else first_update_ever
            fast = new
        total = total + loss(torch.func.functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t])
    return list(torch.autograd.grad(total / sx.shape[0], params))


def rel(a, b):
    return E.rel(a, b)


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_meta_gradient_equals_oracle(kind, setting):
    model, batch, loss = cases()[kind]
    sgd = SGD_SETTINGS[setting]
    m = copy.deepcopy(model)
    got = script(fto, m, batch, 2, loss, sgd)[:len(list(model.parameters()))]
    want = oracle(copy.deepcopy(model), batch, 2, loss, sgd)
    assert rel(got, want) <= TOL
    # after the loop the module holds its own Parameters again (the meta-optimizer steps those)
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_same_gradients_and_buffers_as_torchopt(kind, setting):
    torchopt = library("torchopt")
    model, batch, loss = cases()[kind]
    got = script(fto, copy.deepcopy(model), batch, 2, loss, SGD_SETTINGS[setting])
    want = script(torchopt, copy.deepcopy(model), batch, 2, loss, SGD_SETTINGS[setting])
    assert rel(got, want) <= TOL


def test_published_omniglot_example_same_as_torchopt():
    """TorchOpt's examples/few-shot/maml_omniglot.py pattern, float64: one meta-iteration (2 tasks, 5 inner
    steps, Adam) and the test loop; the original vs the import swap. 16 channels instead of 64 keeps the
    float64 double backward of 100 images per task within seconds; every layer type is there."""
    torchopt = library("torchopt")
    theirs = E.run(E.TorchOptOmniglot, torchopt, iterations=1, tasks=2, channels=16)
    ours = E.run(E.TorchOptOmniglot, fto, iterations=1, tasks=2, channels=16)
    diffs = E.differences(ours, theirs)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("by", ["reference", "ref", "copy", "clone", "deepcopy", "deepclone"])
@pytest.mark.parametrize("detach_buffers", [False, True])
@pytest.mark.parametrize("with_buffers", [True, False])
def test_extract_state_dict_matches_torchopt(by, detach_buffers, with_buffers):
    torchopt = library("torchopt")
    net = conv_bn(hidden=3).double()
    x = classification_batch(1, seed=4)[0][0]
    inner = torchopt.MetaSGD(net, lr=0.1)
    inner.step(net(x).logsumexp(1).mean())   # parameter slots now hold non-leaf tensors
    kw = dict(by=by, detach_buffers=detach_buffers, with_buffers=with_buffers, enable_visual=True, visual_prefix="p.")
    ours, theirs = fto.extract_state_dict(net, **kw), torchopt.extract_state_dict(net, **kw)
    assert ours._fields == theirs._fields and ours.detach_buffers == theirs.detach_buffers
    assert len(ours.params) > 0 and len(ours.buffers) == (2 if with_buffers else 0)  # 2 BatchNorms
    for is_buffer, a_dicts, b_dicts in ((False, ours.params, theirs.params), (True, ours.buffers, theirs.buffers)):
        assert [list(d) for d in a_dicts] == [list(d) for d in b_dicts]
        for da, db in zip(a_dicts, b_dicts):
            for k in da:
                a, b = da[k], db[k]
                assert torch.equal(a, b) and type(a) is type(b) and a.requires_grad == b.requires_grad
                # a reference is the module's own tensor (both then hold the same one), any copy a new one
                assert (a is b) == (by in ("reference", "ref") and not (is_buffer and detach_buffers))
                assert type(a.grad_fn) is type(b.grad_fn)
    assert {k: (v if isinstance(v, str) else v[0]) for k, v in ours.visual_contents.items()} == \
        {k: (v if isinstance(v, str) else v[0]) for k, v in theirs.visual_contents.items()}


@pytest.mark.parametrize("detach_buffers", [False, True])
def test_recover_state_dict_matches_torchopt(detach_buffers):
    """What the module holds after recover: the extracted parameters themselves, and the buffers (fresh
    detached copies with detach_buffers) with the values TorchOpt leaves there."""
    torchopt = library("torchopt")
    results = []
    for lib in (fto, torchopt):
        torch.manual_seed(5)
        net = conv_bn(hidden=3).double()
        x = classification_batch(1, seed=5)[0][0]
        state = lib.extract_state_dict(net, by="reference", detach_buffers=detach_buffers)
        inner = lib.MetaSGD(net, lr=0.1)
        inner.step(net(x).logsumexp(1).mean())       # BatchNorm updates the running statistics in place
        lib.recover_state_dict(net, state)
        same_buffer_objects = [b is s for b, s in zip(net.buffers(), [v for d in state.buffers for v in d.values()])]
        results.append(([p is s for p, s in zip(net.parameters(), [v for d in state.params for v in d.values()])],
                        same_buffer_objects, [b.clone() for b in net.buffers()]))
    (p_ours, b_ours, v_ours), (p_theirs, b_theirs, v_theirs) = results
    assert p_ours == p_theirs and all(p_ours)
    assert b_ours == b_theirs and all(b_ours) != detach_buffers
    assert all(torch.equal(a, b) for a, b in zip(v_ours, v_theirs))


def test_torchopt_meta_optimizers_go_to_torchopt():
    torchopt = library("torchopt")
    net = mlp(1, 4, 1).double()
    adam = torchopt.MetaAdam(net, lr=0.01)
    x = torch.randn(6, 1, dtype=torch.float64)
    adam.step(net(x).pow(2).mean())
    ours = fto.extract_state_dict(adam, by="copy")
    theirs = torchopt.extract_state_dict(adam, by="copy")
    flat = lambda s: [t for t in torchopt.pytree.tree_leaves(s) if isinstance(t, torch.Tensor)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(ours), flat(theirs))) and len(flat(ours)) > 0
    fto.recover_state_dict(adam, theirs)
    assert adam.state_dict() is not None


def test_passthrough_names_are_torchopt_s():
    torchopt = library("torchopt")
    assert fto.MetaAdam is torchopt.MetaAdam and fto.MetaOptimizer is torchopt.MetaOptimizer
    assert fto.sgd is torchopt.sgd and fto.apply_updates is torchopt.apply_updates
    assert fto.visual is torchopt.visual and fto.pytree is torchopt.pytree and fto.nn is torchopt.nn
    assert fto.typing is torchopt.typing and fto.utils is torchopt.utils
    assert fto.MetaSGD is not torchopt.MetaSGD and "MetaAdam" in dir(fto) and "MetaSGD" in dir(fto)
    with pytest.raises(AttributeError, match="no_such_name"):
        fto.no_such_name
    net = mlp(1, 4, 1).double()
    clone = fto.module_clone(net, by="deepcopy")          # nn.Module: TorchOpt's own
    assert all(torch.equal(a, b) and a is not b for a, b in zip(clone.parameters(), net.parameters()))


def test_missing_torchopt_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchopt", None)   # as if not installed
    with pytest.raises(ImportError, match=r"fastmaml\.compat\.torchopt\.MetaAdam comes from torchopt, which is "
                                          r"not installed \(pip install torchopt==0\.7\.3\).*MetaSGD"):
        fto.MetaAdam
    with pytest.raises(ImportError, match="module_clone comes from torchopt"):
        fto.module_clone(mlp(1, 3, 1))
    # fastmaml's own names keep working
    model, batch, loss = cases()["mlp"]
    got = script(fto, copy.deepcopy(model), batch, 1, loss, SGD_SETTINGS["plain"])
    assert all(torch.isfinite(g).all() for g in got)
    assert not hasattr(fto, "__path__")   # dunders are AttributeErrors, not ImportErrors


def test_bad_arguments_are_named():
    net = mlp(1, 3, 1)
    with pytest.raises(TypeError, match=r"MetaSGD: lr must be a number .* got '0\.1' \(str\)"):
        fto.MetaSGD(net, lr="0.1")
    with pytest.raises(NotImplementedError, match=r"MetaSGD: lr as a schedule"):
        fto.MetaSGD(net, lr=lambda count: 0.1)
    with pytest.raises(ValueError, match=r"MetaSGD: momentum must be >= 0, got -0\.5"):
        fto.MetaSGD(net, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"nesterov=True needs momentum > 0 and dampening == 0"):
        fto.MetaSGD(net, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(TypeError, match=r"MetaSGD: nesterov must be True or False, got 'yes'"):
        fto.MetaSGD(net, lr=0.1, nesterov="yes")
    with pytest.raises(TypeError, match=r"MetaSGD: module must be a torch\.nn\.Module, got list"):
        fto.MetaSGD(list(net.parameters()), lr=0.1)
    with pytest.raises(ValueError, match=r"extract_state_dict: by must be one of .* got 'bogus'"):
        fto.extract_state_dict(net, by="bogus")
    with pytest.raises(TypeError, match=r"extract_state_dict: target must be a torch\.nn\.Module or a MetaSGD"):
        fto.extract_state_dict([torch.zeros(1)])
    with pytest.raises(TypeError, match=r"recover_state_dict: state for a module must be .*ModuleState\), got OrderedDict"):
        fto.recover_state_dict(net, net.state_dict())
    inner = fto.MetaSGD(net, lr=0.1)
    with pytest.raises(NotImplementedError, match=r"module_clone of a fastmaml\.compat\.torchopt\.MetaSGD"):
        fto.module_clone(inner)


def test_nan_inner_loss_is_refused_naming_the_call():
    torch.manual_seed(3)
    net = mlp(1, 4, 1).double()
    x = torch.randn(6, 1, dtype=torch.float64)
    inner = fto.MetaSGD(net, lr=0.1)
    net_state = fto.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = fto.extract_state_dict(inner, by="reference")
    inner.step(net(x).pow(2).mean())
    fto.recover_state_dict(net, net_state)
    fto.recover_state_dict(inner, opt_state)
    inner.step(net(x).pow(2).mean())                      # task 2, step 1
    before = [p for p in net.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite inner loss nan given to MetaSGD\.step\(\) call 2 of "
                                                 r"task 2 .* TorchOpt would .* NaN"):
        inner.step(net(x).pow(2).mean() * float("nan"))
    assert all(a is b for a, b in zip(net.parameters(), before))   # nothing was updated
    # after the meta-parameters change (an optimizer step), tasks count from 1 again
    fto.recover_state_dict(net, net_state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    with pytest.raises(FloatingPointError, match=r"call 1 of task 1 "):
        inner.step(net(x).pow(2).mean() * float("inf"))


def test_stop_gradient_detaches_in_place():
    net = mlp(1, 4, 1).double()
    inner = fto.MetaSGD(net, lr=0.1, momentum=0.5)
    inner.step(net(torch.randn(6, 1, dtype=torch.float64)).pow(2).mean())
    fast = list(net.parameters())
    assert all(p.grad_fn is not None for p in fast)
    fto.stop_gradient(net)
    assert all(p.grad_fn is None and p.requires_grad for p in fast)
    fto.stop_gradient(inner)
    assert all(t.grad_fn is None for s in inner.state_dict() for t in s)
