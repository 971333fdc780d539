"""The fused path (task-batched layer kernels, HVP by the R-operator) against the per-task oracle.

``backend="reference"`` is a literal per-task loop of the paper's Algorithm 2 over autograd (through
the unrolled graph); the fused path shares none of its computation. float64, whole-gradient relative
error over every model parameter and the learnable rates together, <= 1e-10 (seen: about 1e-15).
Rates start random and non-uniform, so an indexing bug across steps, layers or elements shows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.layers import layer_kernels
from fastmaml.models import Conv4

from helpers import classification_batch, regression_batch

TOL = 1e-10
DT = torch.float64


def conv_bn_pool(hidden=4, ways=3):
    return nn.Sequential(
        nn.Conv2d(1, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(hidden, hidden + 1, 3, padding=1), nn.BatchNorm2d(hidden + 1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear((hidden + 1) * 4, ways))


def conv_stride_mean(ways=3):
    # the paper code's Omniglot variant: stride-2 convolutions, then the mean over space
    return Conv4(ways, hidden=5, max_pool=False, image_size=9)


def conv4_pool(ways=3):
    return Conv4(ways, hidden=4, image_size=9, blocks=2)


def leaky_plain_bn(ways=3):
    # LeakyReLU, BatchNorm without affine parameters, adaptive average pooling, standalone pool
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, ways))


def mlp_bn(ways=3, side=9):
    # the paper's no-convolution Omniglot network, small: Linear, BatchNorm1d, ReLU, ..., Linear
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 7), nn.BatchNorm1d(7), nn.ReLU(),
                         nn.Linear(7, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, ways))


def sine_mlp():
    return fastmaml.models.mlp((9, 8))


CLASSIFIERS = {"conv_bn_pool": conv_bn_pool, "conv_stride_mean": conv_stride_mean, "conv4_pool": conv4_pool,
               "leaky_plain_bn": leaky_plain_bn, "mlp_bn": mlp_bn}


def cls_batch(T=3, shots=2, queries=3, seed=0):
    sx, sy, qx, qy = classification_batch(T, ways=3, shots=shots, queries=queries, size=9, seed=seed)
    # shuffle the labels per task so that no two tasks are alike
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(T):
        sy[t] = sy[t][torch.randperm(sy.shape[1], generator=g)]
        qy[t] = qy[t][torch.randperm(qy.shape[1], generator=g)]
    return sx * 1.3 + 0.2, sy, qx * 0.7 - 0.1, qy


def randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def random_rates(learner: fastmaml.MAML, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lr = learner.inner_lr.lr
    with torch.no_grad():
        lr.copy_(0.05 + 0.25 * torch.rand(lr.shape, generator=g, dtype=lr.dtype))


def meta_grads(model, batch, seed, **kw):
    learner = fastmaml.MAML(copy.deepcopy(model), **kw)
    if learner.inner_lr.learnable:
        random_rates(learner, seed)
    out = learner.meta_step(*batch)
    grads = [p.grad for p in learner.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return grads, out, learner


def rel(a, b):
    fa = torch.cat([x.flatten() for x in a])
    fb = torch.cat([x.flatten() for x in b])
    return float((fa - fb).norm() / fb.norm())


def check(model, batch, seed=0, **kw):
    ref, out_r, _ = meta_grads(model, batch, seed, backend="reference", **kw)
    got, out_f, learner = meta_grads(model, batch, seed, batching="fused", **kw)
    assert learner.execution_path.startswith("fused"), learner.execution_path
    err = rel(got, ref)
    assert err <= TOL, f"{err:.2e}"
    assert torch.allclose(out_f.task_losses, out_r.task_losses, rtol=1e-12, atol=0)
    return err


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("K,first_order", [(1, False), (2, False), (1, True), (3, True)])
def test_every_supported_layer_matches_reference(name, K, first_order):
    model = randomize(CLASSIFIERS[name]().to(DT), 1)
    check(model, cls_batch(), inner_steps=K, first_order=first_order, inner_lr=0.3)


@pytest.mark.parametrize("name", ["conv_bn_pool", "mlp_bn", "conv_stride_mean"])
@pytest.mark.parametrize("K", [1, 3])
def test_adapt_bn(name, K):
    model = randomize(CLASSIFIERS[name]().to(DT), 2)
    check(model, cls_batch(seed=3), inner_steps=K, adapt_bn=True, inner_lr=0.2)


@pytest.mark.parametrize("lr_mode", ["scalar", "per_step", "per_layer_per_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_every_mode(lr_mode, first_order):
    model = randomize(conv_bn_pool().to(DT), 3)
    check(model, cls_batch(seed=4), seed=5, inner_steps=3, learn_lr=True, lr_mode=lr_mode,
          first_order=first_order)


@pytest.mark.parametrize("memory", ["store", "recompute"])
@pytest.mark.parametrize("first_order", [False, True])
def test_multi_step_loss_and_memory_modes(memory, first_order):
    model = randomize(mlp_bn().to(DT), 4)
    check(model, cls_batch(seed=6), inner_steps=5, multi_step_weights=[0.1, 0.3, 0.0, 0.5, 1.0],
          memory=memory, first_order=first_order, learn_lr=True, lr_mode="per_layer_per_step", seed=7)


def _count_support_passes(learner):
    """Wrap the engine's support_grad; returns the list that records each call's step-less count."""
    calls = []
    real = learner.engine.support_grad

    def spy(*a, **k):
        calls.append(k.get("create_graph"))
        return real(*a, **k)

    learner.engine.support_grad = spy
    return calls


@pytest.mark.parametrize("learn_lr,multi_step", [(False, False), (True, False), (True, True)])
def test_store_mode_keeps_every_state_that_fits_and_recomputes_nothing(learn_lr, multi_step):
    """With the default budget (a fraction of the available memory) these small states all fit: the
    reverse pass reruns no support pass (K passes in all), and the meta-gradient is exact."""
    K = 4
    model = randomize(conv_bn_pool().to(DT), 5)
    batch = cls_batch(T=2, shots=1, queries=4, seed=8)
    weights = [0.3, 0.0, 0.2, 1.0] if multi_step else None
    kw = dict(inner_steps=K, memory="store", learn_lr=learn_lr, multi_step_weights=weights)
    if learn_lr:
        kw["lr_mode"] = "per_step"
    check(model, batch, seed=12, **kw)
    learner = fastmaml.MAML(copy.deepcopy(model), batching="fused", **kw)
    assert learner.memory_info is None
    calls = _count_support_passes(learner)
    learner.meta_step(*batch)
    info = learner.memory_info
    assert len(calls) == K, calls
    assert info["mode"] == "store" and info["states_kept"] == list(range(K)) and info["recomputed_steps"] == []
    assert info["budget_bytes"] > info["state_bytes"] > 0 and info["iterates_kept"] == K


def test_store_budget_keeps_what_fits_and_recomputes_the_rest():
    """A budget with room for the iterates and two earlier states: the last step's state (always
    kept) and steps 0 and 1 are kept, steps 2 and 3 are recomputed once each; exact either way."""
    K = 5
    model = randomize(conv_bn_pool().to(DT), 5)
    batch = cls_batch(T=2, shots=1, queries=4, seed=8)
    probe = fastmaml.MAML(copy.deepcopy(model), inner_steps=K, batching="fused")
    probe.meta_step(*batch)
    per_state = probe.memory_info["state_bytes"] // K
    iterates = probe.memory_info["iterate_bytes"] - probe.memory_info["iterate_bytes"] // K  # theta_1..theta_{K-1}
    budget = iterates + 2 * per_state + per_state // 2
    check(model, batch, inner_steps=K, memory="store", store_budget=budget)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_steps=K, batching="fused", store_budget=budget)
    assert learner.store_budget == budget
    calls = _count_support_passes(learner)
    learner.meta_step(*batch)
    info = learner.memory_info
    assert info["states_kept"] == [0, 1, K - 1] and info["recomputed_steps"] == [2, 3], info
    assert len(calls) == K + 2 and info["budget_bytes"] == budget
    learner.store_budget = "1GiB"
    assert learner.store_budget == 2**30
    with pytest.raises(ValueError, match="store_budget"):
        fastmaml.MAML(copy.deepcopy(model), store_budget="lots")


@pytest.mark.parametrize("K,multi_step", [(3, False), (5, False), (5, True)])
def test_store_mode_checkpoints_the_iterates_when_they_outgrow_the_budget(K, multi_step):
    """At large K the iterates alone exceed the store budget: store mode keeps every ceil(sqrt(K))-th
    as a checkpoint (recompute's reverse pass) and stays exact. A budget of 0 forces that here."""
    model = randomize(conv_bn_pool().to(DT), 9)
    batch = cls_batch(T=3, shots=1, queries=6, seed=10)
    weights = [0.2] * (K - 1) + [1.0] if multi_step else None
    check(model, batch, inner_steps=K, memory="store", multi_step_weights=weights, learn_lr=True,
          lr_mode="per_step", seed=11, store_budget=0)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_steps=K, batching="fused", store_budget=0)
    seen = []
    real = learner.engine.reverse

    def spy(loop, *a, **k):  # what the reverse pass is handed, before it consumes the kept states
        seen.append((loop.memory, loop.c, len(loop.checkpoints), sorted(loop.kept)))
        return real(loop, *a, **k)

    learner.engine.reverse = spy
    learner.meta_step(*batch)
    spacing = math.ceil(math.sqrt(K))
    assert seen == [("recompute", spacing, math.ceil(K / spacing), [K - 1])]
    assert learner.memory_info["mode"] == "recompute"


@pytest.mark.parametrize("K", [2, 4, 7])
@pytest.mark.parametrize("learn_lr", [False, True])
def test_recompute_mode_keeps_the_memory_of_one_step(K, learn_lr):
    """recompute mode: the reverse pass reruns each segment from its checkpoint for the iterates and
    each step's support pass again for its HVP, keeping one state at a time: 3K - 2 support passes
    (the last step's state is kept from the forward)."""
    model = randomize(conv_bn_pool().to(DT), 9)
    batch = cls_batch(T=2, shots=1, queries=3, seed=13)
    kw = dict(inner_steps=K, memory="recompute", learn_lr=learn_lr)
    if learn_lr:
        kw["lr_mode"] = "per_step"
    check(model, batch, seed=14, **kw)
    learner = fastmaml.MAML(copy.deepcopy(model), batching="fused", **kw)
    calls = _count_support_passes(learner)
    learner.meta_step(*batch)
    assert len(calls) == 3 * K - 2, calls
    assert learner.memory_info["recomputed_steps"] == list(range(K - 1))
    assert learner.memory_info["budget_bytes"] is None


@pytest.mark.parametrize("budget,passes", [(70_000, 2 * 9 - 1), (0, 3 * 9 - 2)])
def test_store_fallback_keeps_segment_states_within_the_budget(budget, passes):
    """Store mode whose K = 9 iterates (10 KB each here) outgrow the budget keeps every 3rd as a
    checkpoint; the reverse pass keeps a recomputed segment's states (7 KB each) in the rest of the
    budget, so each support pass runs twice (17 in all), or, with no budget left, three times (25)."""
    K = 9
    model = randomize(mlp_bn().to(DT), 15)
    batch = cls_batch(T=2, shots=1, queries=4, seed=16)
    check(model, batch, inner_steps=K, store_budget=budget)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_steps=K, batching="fused", store_budget=budget)
    calls = _count_support_passes(learner)
    learner.meta_step(*batch)
    info = learner.memory_info
    assert info["mode"] == "recompute" and info["iterates_kept"] == 3 and info["states_kept"] == [K - 1], info
    assert (K - 1) * (info["iterate_bytes"] // 3) > budget  # why it fell back to checkpoints
    assert len(calls) == passes, (len(calls), passes)


@pytest.mark.parametrize("adapt", [["4.weight", "4.bias", "9.weight", "9.bias"], ["9.weight", "9.bias"], ["0.bias", "9.bias"]])
def test_adapted_subsets(adapt):
    """ANIL (only the head), a middle layer and the head, biases only: the frozen part still gets
    its meta-gradient through the inner loop (the mixed second derivative)."""
    model = randomize(conv_bn_pool().to(DT), 6)
    check(model, cls_batch(seed=9), inner_steps=2, adapt=adapt)


def test_regression_mlp():
    model = randomize(sine_mlp().to(DT), 7)
    check(model, regression_batch(4, n_support=5, n_query=7, seed=3), inner_steps=3, inner_lr=0.05)


def test_frozen_parameters_are_constants():
    model = randomize(conv_bn_pool().to(DT), 8)
    model[0].weight.requires_grad_(False)
    check(model, cls_batch(seed=10), inner_steps=2)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_layer_kernel_backends_inside_the_engine(backend):
    try:
        layer_kernels(torch.device("cpu"), backend)
    except RuntimeError as e:
        pytest.skip(str(e))
    model = randomize(conv_bn_pool().to(DT), 9)
    batch = cls_batch(T=2, seed=11)
    ref, _, _ = meta_grads(model, batch, 0, backend="reference", inner_steps=2)
    got, _, learner = meta_grads(model, batch, 0, batching="fused", kernels=backend, inner_steps=2)
    assert f"{backend} layer kernels" in learner.execution_path
    assert rel(got, ref) <= TOL


def test_float32_fused_path_is_as_close_as_the_float32_reference():
    """In float32 both the fused path and the reference round; against the float64 oracle the fused
    path must be no worse than 4x the float32 reference's own distance (and below 1e-4)."""
    model = randomize(conv_bn_pool(), 10)
    batch32 = cls_batch(T=4, seed=12)
    batch32 = tuple(t.float() if t.is_floating_point() else t for t in batch32)
    batch64 = tuple(t.double() if t.is_floating_point() else t for t in batch32)
    oracle, _, _ = meta_grads(model.double(), batch64, 0, backend="reference", inner_steps=2)
    model = model.float()
    ref32, _, _ = meta_grads(model, batch32, 0, backend="reference", inner_steps=2)
    got32, _, _ = meta_grads(model, batch32, 0, batching="fused", inner_steps=2)
    err_ref = rel([g.double() for g in ref32], oracle)
    err_fused = rel([g.double() for g in got32], oracle)
    assert err_fused < max(4 * err_ref, 1e-6) and err_fused < 1e-4, (err_fused, err_ref)


def test_adapt_and_predict_use_the_fused_path():
    model = randomize(conv4_pool().to(DT), 11)
    sx, sy, qx, qy = cls_batch(seed=13)
    fused = fastmaml.MAML(copy.deepcopy(model), inner_steps=2, batching="fused")
    generic = fastmaml.MAML(copy.deepcopy(model), inner_steps=2, batching="vmap")
    assert generic.execution_path.startswith("generic (vmap)")
    fa, ga = fused.adapt(sx, sy, steps=3), generic.adapt(sx, sy, steps=3)
    assert rel([fa.flat], [ga.flat]) < 1e-13
    assert rel([fused.predict(fa, qx)], [generic.predict(ga, qx)]) < 1e-13
    ef, eg = fused.evaluate(sx, sy, qx, qy, steps=2), generic.evaluate(sx, sy, qx, qy, steps=2)
    assert torch.allclose(ef.task_losses, eg.task_losses, rtol=1e-12, atol=0)


# -- which path, and why --------------------------------------------------------------------------

class OwnForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x) * 2


@pytest.mark.parametrize("model,culprit", [
    (nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)), "1 (Tanh)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Dropout(0.0), nn.Flatten(), nn.Linear(8, 2)), "1 (Dropout)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dilation=2)), "0 (Conv2d)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3)), "1 (MaxPool2d)"),
    (OwnForward(), "OwnForward"),
])
def test_fallback_names_the_module(model, culprit):
    learner = fastmaml.MAML(model)
    assert learner.execution_path.startswith("generic"), learner.execution_path
    assert culprit in learner.execution_path
    with pytest.raises(ValueError, match="batching='fused' cannot run this model"):
        fastmaml.MAML(model, batching="fused")


def test_custom_loss_takes_the_generic_path_and_says_so():
    model = randomize(conv_bn_pool().to(DT), 12)
    learner = fastmaml.MAML(model)
    assert learner.execution_path.startswith("fused")
    assert "loss_fn" in learner.engine.path(loss_fn=lambda p, y: (p - y).abs().mean())


def test_conv4_and_paper_mlp_are_fused_by_default():
    assert fastmaml.MAML(fastmaml.models.conv4(5)).execution_path.startswith("fused")
    assert fastmaml.MAML(fastmaml.models.conv4(5, max_pool=False)).execution_path.startswith("fused")
    assert fastmaml.MAML(fastmaml.models.mlp()).execution_path.startswith("fused")


def test_triton_probe_reports_a_broken_kernel(monkeypatch):
    """A Triton that cannot build or run the layer kernels is found by the one-time probe: asked by
    name it raises and says why; under auto the engine keeps working on the reference kernels."""
    import fastmaml.layers.backends as L

    ns, why = L._triton()
    if ns is None:
        pytest.skip(why)
    assert L._triton_on(torch.device("cpu"))[0] is not None  # the real kernels pass the probe
    broken = L._namespace("triton", **{fn: getattr(ns, fn) for fn in L.SWAPPABLE})

    def fails(*a, **k):
        raise RuntimeError("PTX compile failed")

    broken.bn_act_pool_rforward = fails
    monkeypatch.setattr(L, "_triton", lambda: (broken, ""))
    L._triton_on.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="PTX compile failed"):
            L.layer_kernels(torch.device("cpu"), "triton")
    finally:
        L._triton_on.cache_clear()
