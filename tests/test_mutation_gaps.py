"""Engine tests that close the gaps a mutation check found (issue 15).

Each test names the planted bug (bench/mutation_check.py) it is there to catch. All compare the
task-batched engine with the per-task oracle (fastmaml/reference/maml.py) in float64, by the
whole-gradient relative error ||a - b|| / ||b|| over every parameter (learning rates included),
from fresh random inputs and random, non-uniform inner learning rates.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from helpers import (classification_batch, conv_bn, grads_of, mlp, regression_batch, rel_err, run,
                     run_random_rates, set_random_rates)

TOL = 1e-14  # float64, engine vs oracle


def _ramp(K):
    return [0.3 + 0.7 * (k + 1) / K for k in range(K)]


@pytest.mark.parametrize("mode", ["per_step", "per_layer_per_step", "per_parameter"])
@pytest.mark.parametrize("learn", [True, False], ids=["learned", "fixed"])
def test_random_non_uniform_rates_mlp(mode, learn):
    """Catches a rate read at the wrong step, layer or element (mutant lslr_rate_off_by_one: step
    k+1's LSLR rates used at step k). Uniform initial rates hide every such indexing bug."""
    torch.manual_seed(21)
    model = mlp(hidden=5).double()
    batch = regression_batch(3, n_support=7, n_query=5, seed=21)
    kw = dict(inner_steps=3, lr_mode=mode, learn_lr=learn, inner_lr=0.1)
    ref, out_ref, _ = run_random_rates(model, batch, "reference", seed=5, **kw)
    eng, out_eng, _ = run_random_rates(model, batch, "engine", seed=5, **kw)
    assert rel_err(eng, ref) <= TOL
    torch.testing.assert_close(out_eng.task_losses, out_ref.task_losses, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode,adapt_bn,memory", [("per_layer_per_step", True, "store"),
                                                  ("per_layer_per_step", False, "recompute"),
                                                  ("per_parameter", True, "store")])
def test_random_non_uniform_rates_conv_bn(mode, adapt_bn, memory):
    """The paper's conv block with learned non-uniform rates (LSLR / Meta-SGD), BN affine adapted or
    not, both memory modes: catches rate indexing bugs across layers (mutant lslr_rate_off_by_one)."""
    torch.manual_seed(22)
    model = conv_bn().double()
    batch = classification_batch(3, seed=22)
    kw = dict(inner_steps=3, lr_mode=mode, learn_lr=True, inner_lr=0.1, adapt_bn=adapt_bn, memory=memory,
              multi_step_weights=_ramp(3))
    ref, _, _ = run_random_rates(model, batch, "reference", seed=6, **kw)
    eng, _, _ = run_random_rates(model, batch, "engine", seed=6, **kw)
    assert rel_err(eng, ref) <= TOL


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_first_order_multi_step_loss_without_learned_rates(K, memory):
    """First order + multi-step loss with fixed rates: the reverse pass's branch that adds
    w_k grad L_Q(theta_k) without a reverse_step (mutant engine_first_order_multistep). No other
    test runs that line."""
    torch.manual_seed(23 + K)
    model = mlp().double()
    batch = regression_batch(3, seed=23 + K)
    kw = dict(inner_steps=K, first_order=True, inner_lr=[0.15 + 0.05 * k for k in range(K)],
              multi_step_weights=_ramp(K), memory=memory)
    ref, out_ref, _ = run(model, batch, "reference", **kw)
    eng, out_eng, _ = run(model, batch, "engine", **kw)
    assert rel_err(eng, ref) <= TOL
    torch.testing.assert_close(out_eng.loss, out_ref.loss, rtol=1e-12, atol=0)


FIRST_ORDER_CASES = {
    "recompute": dict(memory="recompute"),
    "recompute_learn_lslr": dict(memory="recompute", learn_lr=True, lr_mode="per_layer_per_step"),
    "adapt_head": dict(adapt="head"),
    "adapt_head_learn_meta_sgd": dict(adapt="head", learn_lr=True, lr_mode="per_parameter"),
    "adapt_bn": dict(adapt_bn=True),
    "adapt_bn_multi_step": dict(adapt_bn=True, multi_step_weights="ramp"),
}


@pytest.mark.parametrize("case", sorted(FIRST_ORDER_CASES))
def test_first_order_with_recompute_adapt_subsets_and_adapt_bn(case):
    """First order combined with memory='recompute', an adapt subset (ANIL: the shared body gets its
    gradient only from the query loss) and adapt_bn, on the conv+BN net, K = 3."""
    torch.manual_seed(24)
    model = conv_bn().double()
    batch = classification_batch(3, seed=24)
    kw = dict(FIRST_ORDER_CASES[case], inner_steps=3, first_order=True, inner_lr=0.2)
    if kw.get("adapt") == "head":
        kw["adapt"] = [n for n, _ in model.named_parameters()][-2:]
    if kw.get("multi_step_weights") == "ramp":
        kw["multi_step_weights"] = _ramp(3)
    ref, _, _ = run_random_rates(model, batch, "reference", seed=7, **kw)
    eng, _, _ = run_random_rates(model, batch, "engine", seed=7, **kw)
    assert rel_err(eng, ref) <= TOL


def test_first_order_differs_from_second_order_with_recompute():
    """A recompute path that silently fell back to first order (or the reverse) would pass a test
    that compares only one of the two; here both are checked and must differ."""
    torch.manual_seed(25)
    model = conv_bn().double()
    batch = classification_batch(3, seed=25)
    so_ref, _, _ = run(model, batch, "reference", inner_steps=4, inner_lr=0.3)
    so_eng, _, _ = run(model, batch, "engine", inner_steps=4, inner_lr=0.3, memory="recompute")
    fo_eng, _, _ = run(model, batch, "engine", inner_steps=4, inner_lr=0.3, memory="recompute", first_order=True)
    assert rel_err(so_eng, so_ref) <= TOL
    assert rel_err(fo_eng, so_ref) > 1e-3


# -- float32 ------------------------------------------------------------------------------------

# Float32 engine vs the float32 oracle: both round differently (batched vs per task, fused ops vs
# autograd); observed whole-gradient relative errors are 0.5e-7 to 1.4e-7 on these nets; 1e-6 leaves 7x room.
F32_TOL = 1e-6


@pytest.mark.parametrize("net,kw", [
    ("mlp", dict(inner_steps=3, learn_lr=True, lr_mode="per_layer_per_step", multi_step_weights=[0.3, 0.5, 1.0])),
    ("mlp", dict(inner_steps=2, learn_lr=True, lr_mode="per_parameter")),
    ("conv", dict(inner_steps=2, learn_lr=True, lr_mode="per_step", adapt_bn=True)),
    ("conv", dict(inner_steps=3, first_order=True, memory="recompute")),
], ids=["mlp_lslr_msl", "mlp_meta_sgd", "conv_per_step_adapt_bn", "conv_fo_recompute"])
def test_float32_engine_matches_float32_oracle(net, kw):
    """Float32 exactness: the engine in float32 is as close to the oracle in float64 as the float32
    oracle itself is (so the engine adds no error beyond float32 rounding), and within F32_TOL of
    the float32 oracle."""
    torch.manual_seed(26)
    model64 = (mlp() if net == "mlp" else conv_bn()).double()
    batch64 = regression_batch(3, seed=26) if net == "mlp" else classification_batch(3, seed=26)
    model32 = copy.deepcopy(model64).float()
    batch32 = tuple(t.float() if t.is_floating_point() else t for t in batch64)
    kw = dict(kw, inner_lr=0.1)
    truth, _, _ = run_random_rates(model64, batch64, "reference", seed=8, **kw)
    ref32, _, _ = run_random_rates(model32, batch32, "reference", seed=8, **kw)
    eng32, _, _ = run_random_rates(model32, batch32, "engine", seed=8, **kw)
    truth32 = [t.float() for t in truth]
    assert rel_err(eng32, ref32) <= F32_TOL
    assert rel_err(eng32, truth32) <= 2 * rel_err(ref32, truth32)


# -- Triton fused ops inside the engine, on the CPU (TRITON_INTERPRET=1, set by conftest) ----------

def _triton_on_cpu():
    ok, why = fastmaml.kernels.probe("triton")
    if not ok:
        pytest.skip(why)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests run Triton there")


@pytest.mark.parametrize("kw", [
    dict(inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step", multi_step_weights=[0.4, 1.0]),
    dict(inner_steps=2, learn_lr=True, lr_mode="per_parameter", first_order=True),
], ids=["lslr_msl", "meta_sgd_fo"])
def test_triton_kernels_inside_the_engine(kw):
    """The engine with kernels='triton' (interpreted on the CPU; a tiny MLP, one program per op)
    against the oracle: catches a Triton kernel that passes its unit tests but is called wrongly by
    the engine (argument order, lr form, shared [P] operand)."""
    _triton_on_cpu()
    torch.manual_seed(27)
    model = mlp(hidden=5).double()
    batch = regression_batch(2, seed=27)
    ref, _, _ = run_random_rates(model, batch, "reference", seed=9, inner_lr=0.1, **kw)
    eng, _, learner = run_random_rates(model, batch, "engine", seed=9, inner_lr=0.1, kernels="triton", **kw)
    assert fastmaml.kernels.resolve(torch.device("cpu"), learner.engine.kernel_backend) == "triton"
    assert rel_err(eng, ref) <= TOL


# -- finite differences ---------------------------------------------------------------------------

FD_TOL = 1e-11


def test_matches_fourth_order_finite_differences_tightly():
    """The engine's meta-gradient (model and learned non-uniform LSLR rates, second order, multi-step
    loss) against the 5-point central difference of J along random directions,
    (8 (J(+e) - J(-e)) - (J(+2e) - J(-2e))) / 12e with e = 1e-4, to 1e-11 relative to max(1, |dJ|).
    Truncation is O(e^4) (~1e-13 here), rounding ~1e-16 |J| / e; observed 3e-14 to 2e-13. The old
    test (2-point, 1e-6) let through any error below one part in a million: this one fails on a
    wrong second-order term of relative size 1e-10."""
    torch.manual_seed(28)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    sx, sy, qx, qy = regression_batch(3, n_support=4, n_query=5, seed=28)
    batch = (torch.cat([sx, sx ** 2], -1), sy, torch.cat([qx, qx ** 2], -1), qy)
    learner = fastmaml.MAML(model, inner_lr=0.2, inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step",
                            multi_step_weights=[0.4, 1.0])
    set_random_rates(learner, 10, lo=0.1, hi=0.4)
    learner.meta_step(*batch)
    params = [p for p in learner.parameters() if p.requires_grad]
    assert len(params) == 5  # 4 model tensors and the rates
    grad = [p.grad.clone() for p in params]
    base = [p.detach().clone() for p in params]

    def J(d, s: float) -> float:
        probe = copy.deepcopy(learner)
        with torch.no_grad():
            for p, b, di in zip([p for p in probe.parameters() if p.requires_grad], base, d):
                p.copy_(b + s * di)
        for p in probe.parameters():
            p.grad = None
        return float(probe.meta_step(*batch).loss)

    eps = 1e-4
    g = torch.Generator().manual_seed(28)
    for trial in range(3):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        fd = (8 * (J(d, eps) - J(d, -eps)) - (J(d, 2 * eps) - J(d, -2 * eps))) / (12 * eps)
        analytic = sum(float((gr * di).sum()) for gr, di in zip(grad, d))
        assert abs(fd - analytic) <= FD_TOL * max(1.0, abs(analytic)), (trial, fd, analytic)


# -- CUDA: every lr form, learned rates, multi-step loss, first order, recompute -----------------------

CUDA_CASES = {
    "lslr_learned_msl": dict(inner_steps=3, learn_lr=True, lr_mode="per_layer_per_step", multi_step_weights=[0.3, 0.5, 1.0]),
    "meta_sgd_learned": dict(inner_steps=2, learn_lr=True, lr_mode="per_parameter"),
    "per_step_fo_msl": dict(inner_steps=3, lr_mode="per_step", first_order=True, multi_step_weights=[0.3, 0.5, 1.0]),
    "per_step_learned_recompute_adapt_bn": dict(inner_steps=4, learn_lr=True, lr_mode="per_step", memory="recompute",
                                                adapt_bn=True),
}


def _engine_on(device: str, case: str, kernels=None):
    """The engine's meta-gradient on ``device`` (conv+BN net, float64, non-uniform rates) and the CPU
    oracle's, as CPU tensors."""
    torch.manual_seed(29)
    model = conv_bn().double()
    batch = classification_batch(3, seed=29)
    kw = dict(CUDA_CASES[case], inner_lr=0.1)
    ref, _, _ = run_random_rates(model, batch, "reference", seed=11, **kw)
    learner = fastmaml.MAML(copy.deepcopy(model).to(device), kernels=kernels, **kw)
    set_random_rates(learner, 11)
    learner.meta_step(*(t.to(device) for t in batch))
    return [g.cpu() for g in grads_of(learner)], ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_engine_lr_forms_multi_step_first_order(case):
    """On CUDA the engine was only tested with a scalar fixed rate, second order, one loss term: here
    learned LSLR / Meta-SGD / per-step rates (non-uniform), the multi-step loss, first order and
    recompute, against the CPU oracle in float64."""
    eng, ref = _engine_on("cuda", case)
    assert rel_err(eng, ref) <= 1e-12  # different summation orders on the GPU (cuDNN, atomics)
