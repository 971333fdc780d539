"""Time of one ``fastmaml.MAML(...).meta_step`` (second order, all parameters adapted, as in
``bench/bench_meta_step.py``) for the engine and the per-task reference, on that script's workloads:

* ``sinusoid``: the 1-40-40-1 MLP, 10-shot, 10 queries, T = 32 tasks, K = 1 and 5 inner steps;
* ``omniglot-5w1s``: the Omniglot conv4 (BatchNorm) on 28x28 inputs, 5-way 1-shot, 15 queries per
  class; T = 8, K = 1 on the CPU (about 1.5 s a step there, one thread), T = 32, K = 1 and 5 on CUDA.

``engine-graph`` (the engine replayed from a CUDA graph) joins on CUDA when bench_meta_step.py knows it.
Before timing, each implementation's meta-gradient is checked against the reference's
(relative error <= 1e-3 on all parameters' ``.grad`` concatenated).
"""

from __future__ import annotations

import pytest
import torch
from bench_meta_step import ENGINE_IMPLS, WORKLOADS, build, make_step

CUDA = torch.cuda.is_available()
# The reference first: its check step supplies the oracle gradient (else oracle() computes it).
IMPLS = ("reference", "engine") + (("engine-graph",) if CUDA and "engine-graph" in ENGINE_IMPLS else ())
CONFIGS = [("sinusoid", 32, 1), ("sinusoid", 32, 5)]
CONFIGS += [("omniglot-5w1s", 32, 1), ("omniglot-5w1s", 32, 5)] if CUDA else [("omniglot-5w1s", 8, 1)]
# Few rounds on the CPU keep the file to a couple of minutes on 2 cores; GPU steps are milliseconds.
ROUNDS = 20 if CUDA else 3
MAX_REL_ERR = 1e-3

_oracle = {}  # (workload, T, K, device) -> the reference meta-gradient, float64 on the CPU


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double().cpu() for p in model.parameters()])


def oracle(workload: str, T: int, K: int, device: str) -> torch.Tensor:
    key = (workload, T, K, device)
    if key not in _oracle:
        model, batch = build(workload, T, device)
        make_step("reference", model, WORKLOADS[workload]["inner_lr"], K, False)(*batch)
        _oracle[key] = flat_grad(model)
    return _oracle[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload,T,K", CONFIGS, ids=[f"{w}-T{t}-K{k}" for w, t, k in CONFIGS])
def test_meta_step(benchmark, device, workload, T, K, impl):
    """One meta-step (support adaptation, query loss, meta-gradient into ``.grad``) on a fixed batch."""
    model, batch = build(workload, T, device)  # the same seeds for every implementation
    step = make_step(impl, model, WORKLOADS[workload]["inner_lr"], K, False)

    # Also the first call (an engine-graph records its graph here), so warm-up only settles caches.
    step(*batch)
    grad = flat_grad(model)
    if impl == "reference":
        _oracle.setdefault((workload, T, K, device), grad)
    expected = oracle(workload, T, K, device)
    rel_err = float((grad - expected).norm() / expected.norm())
    assert rel_err <= MAX_REL_ERR, f"{impl}: meta-gradient differs from the reference's (relative error {rel_err:.2e})"

    def run(*b):
        loss = step(*b)
        if device == "cuda":  # time the step's GPU work, not just its launches
            torch.cuda.synchronize()
        return loss

    benchmark.group = f"meta_step:{workload} T={T} K={K}"
    benchmark.extra_info.update(impl=impl, workload=workload, T=T, K=K, device=device,
                                threads=torch.get_num_threads(), grad_rel_err=rel_err)
    benchmark.pedantic(run, args=batch, rounds=ROUNDS, warmup_rounds=1, iterations=1)
