"""The differentiable task-batched API: adapt(create_graph=True) + learner(fast, x), general losses.

The oracle is written here: a per-task loop of K SGD steps with torch.autograd.grad(create_graph=True)
through torch.func.functional_call, then the outer objective, differentiated by autograd; float64,
whole-gradient relative error <= 1e-10."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmaml
from helpers import classification_batch, conv_bn, mlp, regression_batch

TOL = 1e-10


def rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


def unrolled(model, names, sx, sy, qx, steps, lr, first_order, loss_fn, extra=None):
    """Per task: K SGD steps on ``names`` by autograd; returns the query outputs [T, M, ...]."""
    params = dict(model.named_parameters())
    outs = []
    for t in range(sx.shape[0]):
        fast = dict(params)
        for k in range(steps):
            a = lr[k] if lr.dim() else lr
            pred = functional_call(model, fast, (sx[t],))
            loss = loss_fn(pred, sy[t]) if extra is None else loss_fn(pred, extra(t))
            gs = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
            fast = dict(fast)
            for n, g in zip(names, gs):
                fast[n] = fast[n] - a * g
        outs.append(functional_call(model, fast, (qx[t],)))
    return torch.stack(outs)


def non_bn(model):
    return [n for n, p in model.named_parameters()
            if not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.modules.batchnorm._NormBase)]


def objectives(T):
    w = torch.linspace(0.3, 1.7, T, dtype=torch.float64)
    return {
        "mean": lambda out, y, m: F.cross_entropy(out.flatten(0, 1), y.flatten()) if not y.is_floating_point()
        else F.mse_loss(out, y),
        "weighted+extra": lambda out, y, m: sum(
            w[t] * (F.cross_entropy(out[t], y[t]) if not y.is_floating_point() else F.mse_loss(out[t], y[t]))
            for t in range(T)) + 0.01 * out.pow(2).mean() + 0.003 * sum(p.pow(2).sum() for p in m.parameters()),
    }


CASES = [
    ("mlp", 1, False, False),
    ("mlp", 3, False, False),
    ("mlp", 2, True, False),
    ("conv_bn", 2, False, False),
    ("conv_bn", 2, False, True),
    ("conv_bn", 1, True, True),
]


@pytest.mark.parametrize("kind,steps,first_order,adapt_bn", CASES)
@pytest.mark.parametrize("objective", ["mean", "weighted+extra"])
def test_create_graph_equals_unrolled(kind, steps, first_order, adapt_bn, objective):
    torch.manual_seed(0)
    T = 3
    if kind == "mlp":
        model = mlp(1, 6, 1).double()
        sx, sy, qx, qy = regression_batch(T, seed=1)
        loss = F.mse_loss
    else:
        model = conv_bn(ways=3, hidden=3, size=8).double()
        sx, sy, qx, qy = classification_batch(T, seed=1)
        loss = F.cross_entropy
    lr = 0.25  # exactly representable in float32 (MAML rounds inner_lr through float32: see the report)
    ref_model = copy.deepcopy(model)
    J = objectives(T)[objective]

    learner = fastmaml.MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, adapt_bn=adapt_bn)
    fast = learner.adapt(sx, sy, create_graph=True)
    assert fast.flat.requires_grad and fast.flat.shape == (T, learner.layout.numel)
    J(learner(fast, qx), qy, learner.model).backward()
    got = [p.grad for p in learner.model.parameters()]

    names = [n for n, _ in ref_model.named_parameters()] if adapt_bn else non_bn(ref_model)
    out = unrolled(ref_model, names, sx, sy, qx, steps, torch.tensor(lr, dtype=torch.float64), first_order, loss)
    want = torch.autograd.grad(J(out, qy, ref_model), list(ref_model.parameters()))
    assert rel(got, want) <= TOL


def test_learnable_rates_per_step():
    torch.manual_seed(1)
    T, K = 4, 2
    model = mlp(1, 5, 1).double()
    ref_model = copy.deepcopy(model)
    sx, sy, qx, qy = regression_batch(T, seed=2)
    learner = fastmaml.MAML(model, inner_lr=[0.25, 0.375], inner_steps=K, learn_lr=True)
    fast = learner.adapt(sx, sy, create_graph=True)
    (learner(fast, qx) - qy).pow(2).mean(dim=(1, 2)).sum().backward()
    lr = torch.tensor([0.25, 0.375], dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ref_model.named_parameters()]
    out = unrolled(ref_model, names, sx, sy, qx, K, lr, False, F.mse_loss)
    params = list(ref_model.parameters())
    want = torch.autograd.grad((out - qy).pow(2).mean(dim=(1, 2)).sum(), params + [lr])
    got = [p.grad for p in learner.model.parameters()] + [learner.inner_lr.lr.grad]
    assert rel(got, want) <= TOL
    assert rel(got[-1:], want[-1:]) <= TOL


def test_create_graph_false_unchanged_and_values_equal():
    torch.manual_seed(2)
    model = conv_bn(hidden=3).double()
    sx, sy, qx, qy = classification_batch(2, seed=3)
    learner = fastmaml.MAML(model, inner_lr=0.25, inner_steps=2)
    plain = learner.adapt(sx, sy)
    graph = learner.adapt(sx, sy, create_graph=True)
    assert not plain.flat.requires_grad
    assert torch.allclose(plain.flat, graph.flat.detach(), atol=1e-13, rtol=0)
    assert torch.allclose(plain.support_losses, graph.support_losses, atol=1e-13, rtol=0)
    with torch.no_grad():
        assert torch.allclose(learner(plain, qx), learner.predict(plain, qx), atol=1e-12, rtol=0)
    with pytest.raises(TypeError, match="create_graph must be a bool"):
        learner.adapt(sx, sy, create_graph=1)


def test_backward_twice_is_an_error_and_zero_steps():
    model = mlp(1, 4, 1).double()
    sx, sy, qx, qy = regression_batch(2, seed=4)
    learner = fastmaml.MAML(model, inner_lr=0.125)
    fast = learner.adapt(sx, sy, create_graph=True)
    loss = (learner(fast, qx) - qy).pow(2).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()
    learner.zero_grad()
    fast0 = learner.adapt(sx, sy, steps=0, create_graph=True)
    (learner(fast0, qx) - qy).pow(2).mean().backward()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    (torch.stack([ref(qx[t]) for t in range(2)]) - qy).pow(2).mean().backward()
    assert rel([p.grad for p in learner.model.parameters()], [p.grad for p in ref.parameters()]) <= TOL


# -- general losses -------------------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 6)
        self.b = nn.Linear(3, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, u, w):
        return self.out(torch.tanh(self.a(u) + self.b(w)))


def ragged_batch(T=3, n=7, seed=5):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T, n, 2, generator=g, dtype=torch.float64)
    w = torch.randn(T, n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(T, n, 1, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 2])[:T]
    mask = (torch.arange(n)[None, :] < lengths[:, None]).to(torch.float64)
    return u, w, y, mask


def masked_mse(pred, batch):
    return ((pred - batch["y"]).pow(2).squeeze(-1) * batch["mask"]).sum() / batch["mask"].sum()


def test_several_inputs_masks_closure_equal_unrolled():
    torch.manual_seed(3)
    model = TwoInputs().double()
    ref_model = copy.deepcopy(model)
    u, w, y, mask = ragged_batch()
    qu, qw, qy, qmask = ragged_batch(seed=6)
    learner = fastmaml.MAML(model, inner_lr=0.25, inner_steps=2)
    fast = learner.adapt((u, w), {"y": y, "mask": mask}, loss_fn=masked_mse, create_graph=True)
    out = learner(fast, (qu, qw))
    J = sum(masked_mse(out[t], {"y": qy[t], "mask": qmask[t]}) for t in range(3))
    J.backward()

    names = [n for n, _ in ref_model.named_parameters()]
    params = dict(ref_model.named_parameters())
    outs = []
    for t in range(3):
        fast_t = dict(params)
        for _ in range(2):
            pred = functional_call(ref_model, fast_t, (u[t], w[t]))
            l = ((pred - y[t]).pow(2).squeeze(-1) * mask[t]).sum() / mask[t].sum()
            gs = torch.autograd.grad(l, [fast_t[n] for n in names], create_graph=True)
            fast_t = {n: fast_t[n] - 0.25 * g for n, g in zip(names, gs)}
        outs.append(functional_call(ref_model, fast_t, (qu[t], qw[t])))
    Jr = sum(((outs[t] - qy[t]).pow(2).squeeze(-1) * qmask[t]).sum() / qmask[t].sum() for t in range(3))
    want = torch.autograd.grad(Jr, list(ref_model.parameters()))
    assert rel([p.grad for p in learner.model.parameters()], want) <= TOL


def test_loss_that_vmap_cannot_run_runs_per_task():
    torch.manual_seed(4)
    model = mlp(1, 5, 1).double()
    ref_model = copy.deepcopy(model)
    sx, sy, qx, qy = regression_batch(3, seed=7)

    def picky(pred, y):  # data-dependent Python control flow: vmap refuses it
        err = (pred - y).pow(2).mean()
        return err * 2 if err.item() > 1e9 else err

    learner = fastmaml.MAML(model, inner_lr=0.25, inner_steps=2)
    with pytest.warns(UserWarning, match="task after task"):
        fast = learner.adapt(sx, sy, loss_fn=picky, create_graph=True)
    (learner(fast, qx) - qy).pow(2).mean().backward()
    out = unrolled(ref_model, [n for n, _ in ref_model.named_parameters()], sx, sy, qx, 2,
                   torch.tensor(0.25, dtype=torch.float64), False, F.mse_loss)
    want = torch.autograd.grad((out - qy).pow(2).mean(), list(ref_model.parameters()))
    assert rel([p.grad for p in learner.model.parameters()], want) <= TOL


def test_loss_that_cannot_be_batched_names_both_failures():
    model = mlp(1, 4, 1).double()
    sx, sy, _, _ = regression_batch(2, seed=8)
    learner = fastmaml.MAML(model, inner_lr=0.25)
    with pytest.raises(ValueError, match="cannot be batched over tasks.*vmap failed.*one task"):
        learner.adapt(sx, sy, loss_fn=lambda p, y: (p - y).pow(2), create_graph=True)


def test_loss_modules_take_the_builtin_path():
    from fastmaml.functional_api import resolve_loss
    y_int = torch.zeros(2, 3, dtype=torch.int64)
    y_float = torch.zeros(2, 3, 1, dtype=torch.float64)
    assert resolve_loss(nn.CrossEntropyLoss(), y_int) is None
    assert resolve_loss(nn.MSELoss(), y_float) is None
    for keep in (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(reduction="sum"),
                 nn.MSELoss(reduction="sum"), F.cross_entropy):
        assert resolve_loss(keep, y_int if isinstance(keep, nn.CrossEntropyLoss) else y_float) is keep
    model = conv_bn(hidden=3).double()
    batch = classification_batch(2, seed=9)
    a = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.25)
    b = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.25)
    a.meta_step(*batch)
    b.meta_step(*batch, loss_fn=nn.CrossEntropyLoss())
    assert "fused" in b.engine.path(loss_fn=resolve_loss(nn.CrossEntropyLoss(), batch[1]))
    assert rel([p.grad for p in b.parameters() if p.grad is not None],
               [p.grad for p in a.parameters() if p.grad is not None]) <= TOL


@pytest.mark.parametrize("memory,lr_mode", [("recompute", "per_layer_per_step"), ("store", "per_parameter")])
def test_memory_modes_and_learned_rate_forms(memory, lr_mode):
    """recompute mode (checkpoints) and per-layer / per-parameter learned rates through the Function."""
    torch.manual_seed(5)
    T, K = 3, 3
    model = mlp(1, 5, 1).double()
    ref_model = copy.deepcopy(model)
    sx, sy, qx, qy = regression_batch(T, seed=11)
    learner = fastmaml.MAML(model, inner_lr=0.125, inner_steps=K, learn_lr=True, lr_mode=lr_mode, memory=memory)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct rates per layer / element, exactly representable
        learner.inner_lr.lr.copy_((torch.randint(1, 8, learner.inner_lr.lr.shape, generator=g) / 32).double())
    rates = learner.inner_lr.lr.detach().clone().requires_grad_(True)
    fast = learner.adapt(sx, sy, create_graph=True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ((learner(fast, qx) - qy).pow(2).mean(dim=(1, 2)) * w).sum().backward()

    names = [n for n, _ in ref_model.named_parameters()]
    params = dict(ref_model.named_parameters())
    sizes = [p.numel() for p in params.values()]
    outs = []
    for t in range(T):
        fast_t = dict(params)
        for k in range(K):
            l = F.mse_loss(functional_call(ref_model, fast_t, (sx[t],)), sy[t])
            gs = torch.autograd.grad(l, [fast_t[n] for n in names], create_graph=True)
            if lr_mode == "per_parameter":
                parts = torch.split(rates, sizes)
                fast_t = {n: fast_t[n] - a.view_as(gr) * gr for n, a, gr in zip(names, parts, gs)}
            else:
                fast_t = {n: fast_t[n] - rates[k, i] * gr for i, (n, gr) in enumerate(zip(names, gs))}
        outs.append(functional_call(ref_model, fast_t, (qx[t],)))
    J = ((torch.stack(outs) - qy).pow(2).mean(dim=(1, 2)) * w).sum()
    want = torch.autograd.grad(J, list(params.values()) + [rates])
    got = [p.grad for p in learner.model.parameters()] + [learner.inner_lr.lr.grad]
    assert rel(got, want) <= TOL


def test_no_unrolled_graph_saved_activations_do_not_grow_with_steps():
    """autograd saves the query pass's activations only: the inner loop's backward is the engine's
    reverse pass (which keeps the K iterates [T, P], not K steps of activations)."""
    model = conv_bn(hidden=3).double()
    sx, sy, qx, qy = classification_batch(2, seed=12)

    def saved_bytes(K):
        learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.125, inner_steps=K)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fast = learner.adapt(sx, sy, create_graph=True)
            loss = F.cross_entropy(learner(fast, qx).flatten(0, 1), qy.flatten())
        loss.backward()
        return total[0]

    assert saved_bytes(1) == saved_bytes(6)
