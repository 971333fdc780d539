"""The oracle shares nothing with the engine for what it checks (issue 15).

An oracle that imports the engine's helper for a piece of semantics cannot catch a bug in that
helper: switching BatchNorm to running statistics in ``fastmaml.functional.batch_statistics`` used to
pass every test, because the reference used the same context manager. Here:

* fastmaml/reference/maml.py imports nothing from the engine's modules (checked on its source);
* BatchNorm's per-task batch statistics are checked against a hand-written normalization;
* the learning-rate indexing (``InnerLR.rate``, ``InnerLR.for_tensor``, ``InnerLR.accumulate`` and
  the reference's own ``rate_for``) against a table written out element by element;
* the adapted-parameter selection (``select_adapted``), which the reference still takes from its
  caller, against hand-written name lists;
* the multi-step weights (``MAML._weights``), which the reference also takes from its caller,
  against the objective and the meta-gradient of a hand-written unrolled loop.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.inner_lr import InnerLR
from fastmaml.layout import FlatLayout, select_adapted
from fastmaml.reference import maml as reference
from fastmaml.kernels import flat_torch as ref_ops
from helpers import (LR_MODES, classification_batch, conv_bn, grads_of, mlp, rate_table, regression_batch,
                     rel_err, set_random_rates)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-12  # float64, hand-written loop vs engine and oracle (observed <= 1e-15)


def test_reference_imports_no_engine_helper():
    """The oracle (fastmaml/reference/maml.py) imports nothing from the modules whose semantics it
    verifies: functional (batch statistics, losses), inner_lr (rate indexing), layout (adapted-parameter
    selection), engine, kernels, maml. Catches an oracle quietly re-coupled to the engine."""
    tree = ast.parse((REPO / "fastmaml" / "reference" / "maml.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            imported.append(mod)
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
    banned = ("functional", "inner_lr", "layout", "engine", "kernels", "maml", "cuda_graph")
    for mod in imported:
        if mod.startswith(".") or mod.startswith("fastmaml"):
            assert not any(b in mod.split(".") for b in banned), f"the oracle imports {mod}"
    # ..step_context only carries the inner step to the model's per-step layers (a ContextVar); which
    # step each forward runs at is written out in the oracle itself
    carriers = ("..step_context",)
    assert all(m.split(".")[0] in ("__future__", "contextlib", "dataclasses", "typing", "torch") or m in carriers
               for m in imported), imported



def test_reference_package_holds_only_the_oracle():
    """fastmaml/reference/ is the oracle (maml.py) and nothing the fast paths run: the torch
    implementations of the ops moved to fastmaml/kernels/ (flat_torch.py, cg_torch.py) and the
    layers' to their families in fastmaml/layers/; the old module names are entries of the one
    table of moves (fastmaml/_moved.py), which answers them with the new module objects."""
    import importlib

    from fastmaml.kernels import cg_torch, flat_torch
    from fastmaml.layers import torch_kernels

    files = {p.name for p in (REPO / "fastmaml" / "reference").glob("*.py")}
    assert files == {"__init__.py", "maml.py"}, files
    assert importlib.import_module("fastmaml.reference.ops") is flat_torch
    assert importlib.import_module("fastmaml.reference.cg_ops") is cg_torch
    assert importlib.import_module("fastmaml.layers.reference") is torch_kernels
    # and the oracle's own imports: nothing from the fast paths (checked above), nor the layers
    tree = ast.parse((REPO / "fastmaml" / "reference" / "maml.py").read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any("layers" in m.split(".") for m in mods), mods

# -- BatchNorm: hand-written per-task normalization --------------------------------------------------

def _hand_conv_bn(p, x, eps=1e-5, layers=2):
    """conv_bn's forward with BatchNorm written out: per-channel mean and biased variance of THIS
    batch (one task), never the running statistics."""
    h = x
    i = 0
    for _ in range(layers):
        h = F.conv2d(h, p[f"{i}.weight"], p[f"{i}.bias"], padding=1)
        m = h.mean(dim=(0, 2, 3), keepdim=True)
        v = ((h - m) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - m) / torch.sqrt(v + eps) * p[f"{i + 1}.weight"].view(1, -1, 1, 1) + p[f"{i + 1}.bias"].view(1, -1, 1, 1)
        h = F.max_pool2d(F.relu(h), 2)
        i += 4
    return F.linear(h.flatten(1), p[f"{i + 1}.weight"], p[f"{i + 1}.bias"])


def _bn_model_with_misleading_running_stats(seed):
    torch.manual_seed(seed)
    model = conv_bn().double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    model.eval()  # the paper's mode uses batch statistics in eval mode too
    return model


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_batchnorm_uses_per_task_batch_statistics_by_hand(batching):
    """The engine's task-batched forward (``predict``) equals the hand-written per-task normalization,
    on a model in eval mode whose running statistics are random (so reading them, or pooling the
    statistics over tasks, changes every output). Catches mutant bn_running_stats."""
    model = _bn_model_with_misleading_running_stats(31)
    sx, sy, qx, qy = classification_batch(3, seed=31)
    running = [b.clone() for b in model.buffers()]
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.2, batching=batching)
    pred = learner.predict(learner.adapt(sx, sy, steps=0), qx)
    params = dict(model.named_parameters())
    with torch.no_grad():
        hand = torch.stack([_hand_conv_bn(params, qx[t]) for t in range(3)])
    torch.testing.assert_close(pred, hand, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(running, learner.model.buffers()))


@pytest.mark.parametrize("backend", ["engine", "reference"])
@pytest.mark.parametrize("adapt_bn", [False, True])
def test_batchnorm_meta_step_matches_hand_written_unrolled_loop(backend, adapt_bn):
    """Engine and oracle against a hand-written MAML on the hand-written conv+BN forward, K = 2,
    second order: query losses and the whole meta-gradient. Independent of every fastmaml helper
    (BN mode, adapted set, rates), so it catches a shared bug such as mutant bn_running_stats or
    mutant adapt_bn_ignored."""
    model = _bn_model_with_misleading_running_stats(32)
    batch = classification_batch(3, seed=32)
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    bn_names = {"1.weight", "1.bias", "5.weight", "5.bias"}
    adapted = [n for n in names if adapt_bn or n not in bn_names]
    lrs = [0.125, 0.3125]  # exact in float32 too: see test_float_rate_is_exact_for_a_float64_model
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=lrs, inner_steps=2, adapt_bn=adapt_bn, backend=backend)
    out = learner.meta_step(*batch)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    J = 0.0
    losses = []
    for t in range(3):
        fast = dict(params)
        for k in range(2):
            loss = F.cross_entropy(_hand_conv_bn(fast, sx[t]), sy[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            fast = dict(fast, **{n: fast[n] - lrs[k] * g for n, g in zip(adapted, grads)})
        lq = F.cross_entropy(_hand_conv_bn(fast, qx[t]), qy[t])
        losses.append(lq.detach())
        J = J + lq / 3
    hand = torch.autograd.grad(J, list(params.values()))
    torch.testing.assert_close(out.task_losses, torch.stack(losses), rtol=1e-12, atol=0)
    assert rel_err(grads_of(learner), list(hand)) <= TOL


# -- learning-rate indexing ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", LR_MODES)
def test_inner_lr_indexing_matches_a_hand_written_table(mode):
    """``InnerLR.rate(k)`` (the engine's view, expanded with the layout's segments),
    ``InnerLR.for_tensor(k, i)`` and the oracle's own ``rate_for`` all equal the element-by-element
    table of the documented semantics, for random non-uniform rates, K = 3, odd tensor sizes.
    Catches mutant lslr_rate_off_by_one and any step / layer / element offset."""
    torch.manual_seed(33)
    model = mlp(hidden=3).double()
    names = [n for n, _ in model.named_parameters()]
    layout = FlatLayout.of(model, names)
    sizes = [s.numel() for s in layout.shapes]
    K = 3
    lr_mod = InnerLR(0.1, K, layout, lr_mode=mode, learnable=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(33)
    with torch.no_grad():
        lr_mod.lr.copy_(torch.rand(lr_mod.lr.shape, generator=g, dtype=torch.float64) + 0.01)
    lr = lr_mod.lr.detach()
    table = rate_table(mode, lr, K, sizes)
    segments = layout.segments(torch.device("cpu"))
    for k in range(K):
        rate, segmented = lr_mod.rate(k, lr)
        a = ref_ops.lr_of(rate, segments if segmented else None)
        torch.testing.assert_close(a.expand(sum(sizes)), table[k], rtol=0, atol=0)
        for i, n in enumerate(names):
            lo, hi = layout.offsets[i], layout.offsets[i + 1]
            want = table[k, lo:hi].view(layout.shapes[i])
            got = lr_mod.for_tensor(k, i, layout, lr).expand(layout.shapes[i])
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            mine = reference.rate_for(mode, lr, k, i, names, model).expand(layout.shapes[i])
            torch.testing.assert_close(mine, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", LR_MODES)
def test_inner_lr_accumulate_puts_each_steps_gradient_in_its_place(mode):
    """``accumulate(grad, k, d_rate)``: step k's rate gradient lands where step k's rate lives (row k
    for per-step forms, the whole tensor otherwise), by the adjoint of the table: the rate gradient
    of sum_k <table[k], c_k> for random c_k, summed with ``reduce_like``."""
    torch.manual_seed(34)
    model = mlp(hidden=3).double()
    names = [n for n, _ in model.named_parameters()]
    layout = FlatLayout.of(model, names)
    sizes = [s.numel() for s in layout.shapes]
    K = 3
    lr_mod = InnerLR(0.1, K, layout, lr_mode=mode, learnable=True, dtype=torch.float64)
    g = torch.Generator().manual_seed(34)
    with torch.no_grad():
        lr_mod.lr.copy_(torch.rand(lr_mod.lr.shape, generator=g, dtype=torch.float64) + 0.01)
    c = torch.randn(K, sum(sizes), generator=g, dtype=torch.float64)
    lr = lr_mod.lr.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad((rate_table(mode, lr, K, sizes) * c).sum(), lr)
    got = torch.zeros_like(lr)
    segments = layout.segments(torch.device("cpu"))
    for k in range(K):
        rate, segmented = lr_mod.rate(k, lr.detach())
        lr_mod.accumulate(got, k, ref_ops.reduce_like(c[k], rate, segments if segmented else None))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


# -- adapted-parameter selection ------------------------------------------------------------------

def test_select_adapted_matches_hand_written_lists():
    """``select_adapted`` (which the oracle takes from its caller) on the conv+BN net: BatchNorm's
    affine parameters only with adapt_bn, names and predicates honoured in model order, frozen
    parameters never. Catches mutant adapt_bn_ignored."""
    model = conv_bn().double()
    convs_linear = ["0.weight", "0.bias", "4.weight", "4.bias", "9.weight", "9.bias"]
    every = ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias", "5.weight", "5.bias", "9.weight", "9.bias"]
    assert select_adapted(model, None, False) == convs_linear
    assert select_adapted(model, None, True) == every
    assert select_adapted(model, ["9.bias", "0.weight"], False) == ["0.weight", "9.bias"]
    assert select_adapted(model, lambda n, p: n.startswith("9."), True) == ["9.weight", "9.bias"]
    model[4].bias.requires_grad_(False)
    assert select_adapted(model, None, True) == [n for n in every if n != "4.bias"]
    assert fastmaml.MAML(model, adapt_bn=False).adapted_names == tuple(n for n in convs_linear if n != "4.bias")


# -- multi-step weights ---------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 1.0], [0.7, 0.0, 0.4]], ids=["default", "ramp", "gap"])
@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_objective_and_gradient_match_a_hand_written_unrolled_loop(weights, backend):
    """J = (1/T) sum_t sum_k w_k L_Q(theta_k) (default: w_K = 1 only) and its gradient (model and
    learned non-uniform per-step rates, second order), written out by hand on an MLP, against
    ``meta_step`` of the engine and of the oracle. Both take the weights from ``MAML._weights``:
    this catches a wrong default or a shifted weight index there (mutant default_weights_shifted)."""
    torch.manual_seed(35)
    model = mlp(hidden=4).double()
    batch = regression_batch(3, n_support=6, n_query=5, seed=35)
    sx, sy, qx, qy = batch
    K = 3
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=K, learn_lr=True, lr_mode="per_step",
                            multi_step_weights=weights, backend=backend)
    rates = set_random_rates(learner, 35, lo=0.05, hi=0.3)
    out = learner.meta_step(*batch)
    w = weights or [0.0] * (K - 1) + [1.0]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    lr = rates.clone().requires_grad_(True)
    J = 0.0
    for t in range(3):
        fast = dict(params)
        for k in range(K):
            loss = F.mse_loss(torch.func.functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: fast[n] - lr[k] * g for n, g in zip(fast, grads)}
            if w[k] != 0.0:
                J = J + w[k] * F.mse_loss(torch.func.functional_call(model, fast, (qx[t],)), qy[t]) / 3
    hand = torch.autograd.grad(J, list(params.values()) + [lr])
    torch.testing.assert_close(out.loss, J.detach(), rtol=1e-12, atol=0)
    assert rel_err(grads_of(learner), list(hand)) <= TOL


def test_float_rate_is_exact_for_a_float64_model():
    """inner_lr=0.15 on a float64 model is the float64 number 0.15, not its float32 rounding (a 4e-8
    relative error in every fast weight and every loss of a float64 run)."""
    learner = fastmaml.MAML(mlp().double(), inner_lr=[0.15, 0.35], inner_steps=2)
    assert learner.inner_lr.lr.tolist() == [0.15, 0.35]
