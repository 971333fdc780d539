"""The engine against the per-task reference (the oracle), in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from helpers import classification_batch, conv_bn, grads_of, mlp, regression_batch, rel_err, run

TOL = 1e-10

FEATURES = {
    "plain": dict(),
    "first_order": dict(first_order=True),
    "per_step_lr_list": dict(inner_lr="per_step_list"),
    "learn_scalar": dict(learn_lr=True),
    "learn_per_step": dict(learn_lr=True, lr_mode="per_step"),
    "learn_lslr": dict(learn_lr=True, lr_mode="per_layer_per_step"),
    "learn_meta_sgd": dict(learn_lr=True, lr_mode="per_parameter"),
    "multi_step": dict(multi_step_weights="ramp"),
    "lslr_multi_step_recompute": dict(learn_lr=True, lr_mode="per_layer_per_step", multi_step_weights="ramp",
                                      memory="recompute"),
    "first_order_learn_lr_multi_step": dict(first_order=True, learn_lr=True, lr_mode="per_step",
                                            multi_step_weights="ramp"),
    "recompute": dict(memory="recompute"),
    "adapt_head_only": dict(adapt="head"),
    "adapt_head_learn_lr": dict(adapt="head", learn_lr=True, lr_mode="per_layer_per_step"),
}


def _kwargs(name: str, model: nn.Module, K: int):
    kw = dict(FEATURES[name])
    kw.setdefault("inner_lr", 0.1)
    if kw["inner_lr"] == "per_step_list":
        kw["inner_lr"] = [0.1 + 0.02 * k for k in range(K)]
    if kw.get("multi_step_weights") == "ramp":
        kw["multi_step_weights"] = [0.5 + 0.5 * k / K for k in range(K)]
    if kw.get("adapt") == "head":
        last = [n for n, _ in model.named_parameters()][-2:]
        kw["adapt"] = last
    return dict(kw, inner_steps=K)


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("T", [1, 3])
def test_mlp_regression_matches_reference(feature, K, T):
    torch.manual_seed(100 * K + T)
    model = mlp().double()
    batch = regression_batch(T, seed=K + 10 * T)
    kw = _kwargs(feature, model, K)
    ref, out_ref, _ = run(model, batch, "reference", **kw)
    eng, out_eng, _ = run(model, batch, "engine", **kw)
    assert rel_err(eng, ref) <= TOL
    assert torch.allclose(out_eng.loss, out_ref.loss, rtol=1e-12, atol=0)
    assert torch.allclose(out_eng.task_losses, out_ref.task_losses, rtol=1e-12, atol=0)


CONV_CASES = [
    ("plain", 1, 3), ("plain", 2, 1), ("plain", 5, 3),
    ("first_order", 2, 3), ("learn_lslr", 2, 3), ("learn_meta_sgd", 1, 3),
    ("lslr_multi_step_recompute", 5, 3), ("adapt_head_learn_lr", 2, 3), ("multi_step", 2, 1),
]


@pytest.mark.parametrize("feature,K,T", CONV_CASES)
@pytest.mark.parametrize("adapt_bn", [False, True])
def test_conv_bn_classification_matches_reference(feature, K, T, adapt_bn):
    torch.manual_seed(7 * K + T)
    model = conv_bn().double()
    batch = classification_batch(T, seed=K)
    kw = _kwargs(feature, model, K)
    if "adapt" not in kw:
        kw["adapt_bn"] = adapt_bn
    elif adapt_bn:
        pytest.skip("adapt_bn has no effect when adapt names the parameters")
    ref, out_ref, _ = run(model, batch, "reference", **kw)
    eng, out_eng, _ = run(model, batch, "engine", **kw)
    assert rel_err(eng, ref) <= TOL
    assert torch.allclose(out_eng.task_accuracy, out_ref.task_accuracy)


def test_first_order_matches_reference_and_differs_from_second_order():
    torch.manual_seed(3)
    model = conv_bn().double()
    batch = classification_batch(3, seed=3)
    fo_ref, _, _ = run(model, batch, "reference", inner_steps=2, first_order=True, inner_lr=0.3)
    fo_eng, _, _ = run(model, batch, "engine", inner_steps=2, first_order=True, inner_lr=0.3)
    so_eng, _, _ = run(model, batch, "engine", inner_steps=2, first_order=False, inner_lr=0.3)
    assert rel_err(fo_eng, fo_ref) <= TOL
    # A silently first-order engine would give ~0 here; the second-order term is large at this lr.
    assert rel_err(fo_eng, so_eng) > 1e-3


def test_learnable_lr_receives_grad_and_optimizer_steps():
    torch.manual_seed(4)
    learner = fastmaml.MAML(mlp().double(), inner_lr=0.05, inner_steps=2, learn_lr=True, lr_mode="per_step")
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    before = learner.inner_lr.lr.detach().clone()
    learner.meta_step(*regression_batch(4))
    assert learner.inner_lr.lr.grad is not None and learner.inner_lr.lr.grad.shape == (2,)
    assert float(learner.inner_lr.lr.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(before, learner.inner_lr.lr.detach())


def test_grad_accumulates_like_backward():
    torch.manual_seed(5)
    batch = regression_batch(2)
    learner = fastmaml.MAML(mlp().double(), inner_lr=0.1)
    learner.meta_step(*batch)
    once = grads_of(learner)
    learner.meta_step(*batch)
    twice = grads_of(learner)
    for a, b in zip(once, twice):
        assert torch.allclose(2 * a, b, rtol=1e-12, atol=1e-15)


def test_matches_central_finite_differences():
    """The meta-gradient of J against (J(p + e d) - J(p - e d)) / 2e along random directions."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batch = regression_batch(2, n_support=3, n_query=4)
    batch = (torch.cat([batch[0], batch[0] ** 2], -1), batch[1], torch.cat([batch[2], batch[2] ** 2], -1), batch[3])
    learner = fastmaml.MAML(model, inner_lr=[0.3, 0.2], inner_steps=2, learn_lr=True, multi_step_weights=[0.4, 1.0])
    learner.meta_step(*batch)
    params = [p for p in learner.parameters() if p.requires_grad]
    grad = [p.grad.clone() for p in params]

    def objective() -> float:
        probe = copy.deepcopy(learner)
        for p in probe.parameters():
            p.grad = None
        return float(probe.meta_step(*batch).loss)

    eps = 1e-6
    for trial in range(3):
        d = [torch.randn_like(p) for p in params]
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(eps * di)
        up = objective()
        with torch.no_grad():
            for p, di in zip(params, d):
                p.sub_(2 * eps * di)
        down = objective()
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(eps * di)
        fd = (up - down) / (2 * eps)
        analytic = sum(float((g * di).sum()) for g, di in zip(grad, d))
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), (trial, fd, analytic)


def test_different_steps_at_evaluation():
    torch.manual_seed(8)
    model = conv_bn().double()
    sx, sy, qx, qy = classification_batch(3)
    eng = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2, inner_steps=1)
    ref = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2, inner_steps=1, backend="reference")
    for steps in (1, 4):
        fe, fr = eng.adapt(sx, sy, steps=steps), ref.adapt(sx, sy, steps=steps)
        assert fe.flat.shape == (3, eng.layout.numel)
        assert torch.allclose(fe.flat, fr.flat, rtol=1e-12, atol=1e-14)
        pe, pr = eng.predict(fe, qx), ref.predict(fr, qx)
        assert pe.shape == (3, qx.shape[1], 3)
        assert torch.allclose(pe, pr, rtol=1e-10, atol=1e-12)
    e10 = eng.evaluate(sx, sy, qx, qy, steps=10)
    e0 = eng.evaluate(sx, sy, sx, sy, steps=1)
    assert e10.task_accuracy.shape == (3,) and e0.task_losses.shape == (3,)
    # The meta-gradient with more steps than in training also matches the reference.
    g_eng, _, _ = run(model, (sx, sy, qx, qy), "engine", inner_lr=0.2, inner_steps=1)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2, inner_steps=1)
    learner.meta_step(sx, sy, qx, qy, steps=3)
    ref3 = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2, inner_steps=1, backend="reference")
    ref3.meta_step(sx, sy, qx, qy, steps=3)
    assert rel_err(grads_of(learner), grads_of(ref3)) <= TOL


def test_batchnorm_statistics_are_per_task_and_running_stats_untouched():
    torch.manual_seed(9)
    model = conv_bn().double()
    model.eval()  # the paper's mode uses batch statistics at evaluation too
    bn = model[1]
    running = (bn.running_mean.clone(), bn.running_var.clone())
    sx, sy, qx, qy = classification_batch(3)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2)
    all3 = learner.meta_step(sx, sy, qx, qy).task_losses
    learner1 = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2)
    only0 = learner1.meta_step(sx[:1], sy[:1], qx[:1], qy[:1]).task_losses
    assert torch.allclose(all3[0], only0[0], rtol=1e-12)
    assert torch.equal(learner.model[1].running_mean, running[0])
    assert torch.equal(learner.model[1].running_var, running[1])
    assert not learner.model.training and not learner.model[1].training  # modes restored


def test_custom_loss_fn():
    torch.manual_seed(10)
    model = mlp().double()
    batch = regression_batch(3)

    def huber(pred, y):
        return torch.nn.functional.smooth_l1_loss(pred, y, beta=0.5)

    ref, _, _ = run(model, batch, "reference", inner_steps=2, inner_lr=0.1)
    learner_ref = fastmaml.MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.1, backend="reference")
    learner_ref.meta_step(*batch, loss_fn=huber)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_steps=2, inner_lr=0.1)
    learner.meta_step(*batch, loss_fn=huber)
    assert rel_err(grads_of(learner), grads_of(learner_ref)) <= TOL
    assert rel_err(grads_of(learner), ref) > 1e-3  # the loss really changed


def test_kernel_backends_agree_inside_the_engine():
    torch.manual_seed(11)
    model = conv_bn().double()
    batch = classification_batch(3)
    base, _, _ = run(model, batch, "engine", inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step", kernels="torch")
    for name, status in fastmaml.kernels.available_backends().items():
        if status != "available" or name in ("torch", "cuda", "triton"):
            continue
        other, _, _ = run(model, batch, "engine", inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step", kernels=name)
        assert rel_err(other, base) <= TOL, name


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("feature,K,adapt_bn", [("plain", 2, False), ("plain", 2, True), ("learn_lslr", 2, True),
                                                ("adapt_head_only", 1, False),
                                                ("lslr_multi_step_recompute", 3, False)])
def test_both_batching_strategies_match_reference(batching, feature, K, adapt_bn):
    """vmap included: BatchNorm's input and (with adapt_bn) its affine weight both per task, second
    order. (torch.func's grad-of-vmap gets this case wrong; autograd over a vmapped forward does not.)"""
    torch.manual_seed(12 + K)
    model = conv_bn().double()
    batch = classification_batch(3, seed=12)
    kw = _kwargs(feature, model, K)
    if "adapt" not in kw:
        kw["adapt_bn"] = adapt_bn
    ref, _, _ = run(model, batch, "reference", **kw)
    eng, _, _ = run(model, batch, "engine", batching=batching, **kw)
    assert rel_err(eng, ref) <= TOL


def test_unknown_batching_is_refused():
    with pytest.raises(ValueError, match=r"batching must be one of auto, fused, vmap, loop"):
        fastmaml.MAML(mlp(), batching="grouped")


def test_adapt_with_zero_steps_gives_the_meta_parameters():
    torch.manual_seed(13)
    learner = fastmaml.MAML(mlp().double(), inner_lr=0.1)
    sx, sy, qx, qy = regression_batch(3)
    fast = learner.adapt(sx, sy, steps=0)
    assert fast.flat.shape == (3, learner.layout.numel)
    with torch.no_grad():
        assert torch.allclose(learner.predict(fast, qx), learner.model(qx))
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        learner.meta_step(sx, sy, qx, qy, steps=0)
