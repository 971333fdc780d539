"""Task chunks (issue 12): ``MAML(task_chunk=c)`` runs the T tasks c at a time and gives the unchunked
meta-gradient (float64, 1e-12) with every option; ``"auto"`` picks c from a measured probe under a
memory budget; peak memory at c = T/8 is well below the unchunked one (fresh subprocesses)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import fastmaml
from fastmaml.maml import parse_bytes

from helpers import classification_batch, conv_bn, mlp, regression_batch, rel_err, set_random_rates

T = 8


def step(model, batch, **kw):
    learner = fastmaml.MAML(copy.deepcopy(model), **kw)
    if learner.inner_lr.lr.dim() > 0:
        set_random_rates(learner, 3)
    out = learner.meta_step(*batch)
    grads = [p.grad.clone() for p in learner.parameters() if p.requires_grad]
    return grads, out, learner


def same(a, b, tol=1e-12):
    ga, oa, _ = a
    gb, ob, _ = b
    assert rel_err(ga, gb) <= tol, rel_err(ga, gb)
    assert abs(float(oa.loss) - float(ob.loss)) <= tol * max(1.0, abs(float(ob.loss)))
    torch.testing.assert_close(oa.task_losses, ob.task_losses, rtol=tol, atol=0)
    if ob.task_accuracy is not None:
        assert torch.equal(oa.task_accuracy, ob.task_accuracy)


OPTIONS = {
    "plain": dict(),
    "learn_lslr_multi_step": dict(inner_steps=3, learn_lr=True, lr_mode="per_layer_per_step",
                                  multi_step_weights=[0.2, 0.3, 0.5]),
    "first_order_meta_sgd": dict(inner_steps=2, first_order=True, learn_lr=True, lr_mode="per_parameter"),
    "adapt_head_recompute": dict(inner_steps=3, adapt=["4.weight", "4.bias"], memory="recompute"),
    "reference_learn_lr": dict(inner_steps=2, learn_lr=True, lr_mode="per_step", backend="reference"),
    "loop_batching": dict(inner_steps=2, batching="loop"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_equals_unchunked_mlp(name, chunk):
    torch.manual_seed(0)
    model = mlp().double()
    batch = regression_batch(T, seed=1)
    kw = dict(inner_lr=0.05, **OPTIONS[name])
    same(step(model, batch, task_chunk=chunk, **kw), step(model, batch, **kw))


@pytest.mark.parametrize("chunk", [3, 4])
def test_chunked_equals_unchunked_conv_bn_fused(chunk):
    torch.manual_seed(0)
    model = conv_bn().double()
    batch = classification_batch(T, seed=2)
    kw = dict(inner_lr=0.1, inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step")
    a, b = step(model, batch, task_chunk=chunk, **kw), step(model, batch, **kw)
    assert a[2].execution_path.startswith("fused")
    same(a, b)
    assert a[1].task_accuracy.shape == (T,)


def test_chunk_at_least_T_is_unchunked_and_grads_accumulate():
    torch.manual_seed(0)
    model = mlp().double()
    batch = regression_batch(T, seed=1)
    same(step(model, batch, task_chunk=T + 5), step(model, batch))
    # two meta-steps accumulate into .grad like backward() does, chunked or not
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.05, task_chunk=3)
    learner.meta_step(*batch)
    learner.meta_step(*batch)
    g2 = [p.grad for p in learner.parameters() if p.requires_grad]
    g1, _, _ = step(model, batch, inner_lr=0.05)
    assert rel_err(g2, [2 * g for g in g1]) <= 1e-12


def test_auto_chunk_from_budget():
    torch.manual_seed(0)
    model = conv_bn().double()
    batch = classification_batch(T, seed=2)
    kw = dict(inner_lr=0.1)
    ref = step(model, batch, **kw)
    tiny = step(model, batch, task_chunk="auto", memory_budget=1, **kw)
    assert tiny[2].chunk_info["task_chunk"] == 1
    same(tiny, ref)
    big = step(model, batch, task_chunk="auto", memory_budget="64GiB", **kw)
    assert big[2].chunk_info["task_chunk"] == T
    info = big[2].chunk_info
    assert info["per_task_bytes"] > 0 and info["budget"] == 64 * 2**30 and info["method"]
    # between the two: a budget for about 3 tasks picks a chunk in [1, T), and the same gradient
    mid_budget = int(info["fixed_bytes"] + 3.5 * info["per_task_bytes"])
    mid = step(model, batch, task_chunk="auto", memory_budget=mid_budget, **kw)
    assert 1 <= mid[2].chunk_info["task_chunk"] < T
    same(mid, ref)
    default = step(model, batch, task_chunk="auto", **kw)  # default budget: half the available memory
    assert default[2].chunk_info["task_chunk"] == T


def test_bad_values():
    model = mlp().double()
    for bad in (0, -2):
        with pytest.raises(ValueError, match="task_chunk must be >= 1"):
            fastmaml.MAML(model, task_chunk=bad)
    for bad in (True, 2.5):
        with pytest.raises(TypeError, match="task_chunk must be None, an int >= 1 or 'auto'"):
            fastmaml.MAML(model, task_chunk=bad)
    with pytest.raises(ValueError, match="task_chunk must be None, an int >= 1 or 'auto'"):
        fastmaml.MAML(model, task_chunk="half")
    for bad in ("8 parsecs", "lots", "-1GiB"):
        with pytest.raises(ValueError, match="memory_budget"):
            fastmaml.MAML(model, task_chunk="auto", memory_budget=bad)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="memory_budget must be positive"):
            fastmaml.MAML(model, task_chunk="auto", memory_budget=bad)
    with pytest.raises(TypeError, match="memory_budget"):
        fastmaml.MAML(model, task_chunk="auto", memory_budget=1.5)
    with pytest.raises(ValueError, match="memory_budget applies to task_chunk='auto' only"):
        fastmaml.MAML(model, task_chunk=4, memory_budget="1GiB")
    assert fastmaml.MAML(model, memory_budget="1GiB").task_chunk == "auto"
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512 MB") == 512 * 10**6 and parse_bytes(4096) == 4096


def test_non_finite_names_the_global_task():
    torch.manual_seed(0)
    model = mlp().double()
    sx, sy, qx, qy = regression_batch(T, seed=1)
    qy = qy.clone()
    qy[6, 0] = 1e300  # the query loss of task 6 overflows
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.05, task_chunk=4)
    with pytest.raises(FloatingPointError, match="of task 6"):
        learner.meta_step(sx, sy, qx, qy)
    assert all(p.grad is None for p in learner.parameters())


PROBE = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_task_chunk.py")


def peak_excess(chunk: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, PROBE, "--probe", chunk, "--tasks", "32", "--queries", "1",
                          "--repeats", "1"], check=True,
                         capture_output=True, text=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak"] - r["baseline"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via getrusage is read in KiB on Linux")
def test_peak_memory_scales_with_chunk():
    full, eighth = peak_excess("0"), peak_excess("4")
    assert eighth <= 0.6 * full, (eighth, full)
