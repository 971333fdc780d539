"""Evaluation numbers against a direct computation (issue 15).

The evaluation and CLI tests used to check shapes, ranges and exit codes: ``fastmaml eval`` reporting
the MSE after k-1 steps as "after k steps", or ``MAML.evaluate`` ignoring ``steps``, passed them all.
Here every number is recomputed by hand: plain per-task SGD with autograd (tests/helpers.py
``hand_adapt``), the prediction by ``functional_call``, the loss, accuracy and the 95% interval
written out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmaml
from fastmaml.app import cli, configs
from fastmaml.app import evaluate as ev
from fastmaml.app.episodes import fixed_episodes
from fastmaml.app.errors import UserError
from fastmaml.app.run_setup import make_dataset
from helpers import hand_adapt, mlp, rate_table, regression_batch

CPU = torch.device("cpu")


def _hand_losses(model, names, rates, sx, sy, qx, qy, steps, classification=False):
    """[T] query losses (and [T] accuracies) after ``steps`` hand-written SGD steps per task."""
    losses, accs = [], []
    for t in range(sx.shape[0]):
        fast = hand_adapt(model, names, sx[t], sy[t], steps, rates)[-1]
        with torch.no_grad():
            pred = functional_call(model, fast, (qx[t],))
        if classification:
            losses.append(F.cross_entropy(pred, qy[t]))
            accs.append((pred.argmax(-1) == qy[t]).double().mean())
        else:
            losses.append(((pred - qy[t]) ** 2).mean())
    return torch.stack(losses), (torch.stack(accs) if accs else None)


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_evaluate_regression_matches_hand_adaptation_for_each_steps(backend):
    """``MAML.evaluate(steps=s)`` equals s hand-written SGD steps then the query MSE, for s = 1, 2, 5
    (a learner trained with inner_steps = 1), and the three results differ: catches mutant
    evaluate_ignores_steps."""
    torch.manual_seed(51)
    model = mlp(hidden=6).double()
    sx, sy, qx, qy = regression_batch(4, n_support=7, n_query=9, seed=51)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.0625, inner_steps=1, backend=backend)
    names = list(learner.adapted_names)
    sizes = [p.numel() for n, p in model.named_parameters() if n in names]
    seen = []
    for steps in (1, 2, 5):
        out = learner.evaluate(sx, sy, qx, qy, steps=steps)
        rates = rate_table("scalar", torch.tensor(0.0625, dtype=torch.float64), steps, sizes)
        want, _ = _hand_losses(model, names, rates, sx, sy, qx, qy, steps)
        torch.testing.assert_close(out.task_losses, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.loss, want.mean(), rtol=1e-12, atol=0)
        seen.append(out.loss)
    assert len({float(x) for x in seen}) == 3


def test_evaluate_classification_loss_and_accuracy_by_hand():
    """Classification: query cross-entropy and accuracy after 3 steps with learned non-uniform
    per-layer-per-step rates, by hand (an MLP on 5 features, 3 classes)."""
    torch.manual_seed(52)
    model = mlp(in_features=5, hidden=6, out=3).double()
    g = torch.Generator().manual_seed(52)
    T, N, Q = 3, 6, 9
    sx = torch.randn(T, N, 5, generator=g, dtype=torch.float64)
    qx = torch.randn(T, Q, 5, generator=g, dtype=torch.float64)
    sy = torch.randint(0, 3, (T, N), generator=g)
    qy = torch.randint(0, 3, (T, Q), generator=g)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=3, learn_lr=True,
                            lr_mode="per_layer_per_step")
    gen = torch.Generator().manual_seed(53)
    with torch.no_grad():
        learner.inner_lr.lr.copy_(torch.rand(learner.inner_lr.lr.shape, generator=gen, dtype=torch.float64) * 0.5 + 0.1)
    names = list(learner.adapted_names)
    sizes = [p.numel() for n, p in model.named_parameters() if n in names]
    rates = rate_table("per_layer_per_step", learner.inner_lr.lr.detach(), 3, sizes)
    out = learner.evaluate(sx, sy, qx, qy, steps=3)
    want_loss, want_acc = _hand_losses(model, names, rates, sx, sy, qx, qy, 3, classification=True)
    torch.testing.assert_close(out.task_losses, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.task_accuracy, want_acc, rtol=0, atol=0)


def test_regression_errors_row_k_is_k_steps_by_hand():
    """``fastmaml.app.evaluate.regression_errors`` (the CLI's MSE-by-step table): row k is the MSE after
    exactly k hand-written steps, k = 0..4. Catches mutant eval_mse_k_minus_1."""
    torch.manual_seed(54)
    model = mlp(hidden=6).double()
    sx, sy, qx, qy = regression_batch(3, n_support=6, n_query=8, seed=54)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.0625)
    names = list(learner.adapted_names)
    sizes = [p.numel() for n, p in model.named_parameters() if n in names]
    rates = rate_table("scalar", torch.tensor(0.0625, dtype=torch.float64), 4, sizes)
    rows = ev.regression_errors(learner, sx, sy, qx, qy, 4)
    assert rows.shape == (5, 3)
    for k in range(5):
        want, _ = _hand_losses(model, names, rates, sx, sy, qx, qy, k)
        torch.testing.assert_close(rows[k], want, rtol=1e-12, atol=0)


def test_mean_ci95_by_hand():
    """The 95% interval is 1.96 * sample std (ddof = 1) / sqrt(n) (catches mutant eval_ci_ddof0)."""
    vals = [0.3, 0.9, 0.4, 0.65, 0.1]
    m = sum(vals) / 5
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / 4)
    mean, ci = ev.mean_ci95(vals)
    assert mean == pytest.approx(m, rel=1e-15) and ci == pytest.approx(1.96 * s / math.sqrt(5), rel=1e-14)
    assert ev.mean_ci95([0.5]) == (0.5, None)


def test_cli_eval_sinusoid_numbers_by_hand(tmp_path, capsys):
    """``fastmaml train sinusoid-tiny`` (2 iterations) then ``fastmaml eval --steps 3``: every entry of
    eval.json's MSE-by-step table (mean and CI) equals a hand computation on the same fixed episodes
    from the checkpoint's weights: k hand-written SGD steps per task with the config's inner rate,
    then the query MSE. And the MSE falls with every step (the sinusoid regression the paper
    evaluates). Catches mutants eval_mse_k_minus_1, evaluate_ignores_steps and eval_ci_ddof0."""
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["train", "sinusoid-tiny", "--out", str(run), "--threads", "1", "--quiet", "--set",
                       "iterations=2", "checkpoint_every=2", "val_every=2", "log_every=1", "val_episodes=2",
                       "meta_lr=0.001"])  # meta_lr: the paper's, at which 2 steps leave the MSE falling by step
        assert rc == 0
        rc = cli.main(["eval", str(run), "--episodes", "12", "--steps", "3", "--batch", "5", "--quiet"])
        assert rc == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    result = json.loads((run / "eval.json").read_text())
    config = configs.get("sinusoid-tiny")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    from fastmaml import models

    model = models.build(dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    lr = float(ckpt["inner_lr"]["lr"])
    assert lr == pytest.approx(config["inner_lr"], rel=1e-6)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    rates = rate_table("scalar", torch.tensor(lr, dtype=torch.float32), 3, sizes)
    ds = make_dataset(config, "test", None, CPU, queries=config["eval_queries"], seed=config["eval_seed"])
    per_step = [[] for _ in range(4)]
    for sx, sy, qx, qy in fixed_episodes(ds, 12, 5, config["eval_seed"]):
        for k in range(4):
            per_step[k] += _hand_losses(model, names, rates, sx, sy, qx, qy, k)[0].double().tolist()
    assert result["steps"] == 3 and result["episodes"] == 12
    assert [r["steps"] for r in result["mse_by_step"]] == [0, 1, 2, 3]
    for k, row in enumerate(result["mse_by_step"]):
        a = np.asarray(per_step[k])
        assert row["mse"] == pytest.approx(a.mean(), rel=1e-5), k
        assert row["mse_ci95"] == pytest.approx(1.96 * a.std(ddof=1) / math.sqrt(a.size), rel=1e-4), k
    mses = [r["mse"] for r in result["mse_by_step"]]
    assert all(b < a for a, b in zip(mses, mses[1:])), mses
    assert result["mse"] == mses[-1]


def _bn_classifier():
    # BatchNorm with batch statistics (track_running_stats=False), as the paper's networks: the
    # outputs of a query image depend on the other images of its forward pass
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def _episode_batch(T, N, K, Q, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, 5, dtype=torch.float64)  # features of unequal spread
    sx = torch.randn(T, N * K, 5, generator=g, dtype=torch.float64) * scale + 0.3
    qx = torch.randn(T, N * Q, 5, generator=g, dtype=torch.float64) * scale + 0.3
    sy = torch.arange(N).repeat_interleave(K).expand(T, -1).contiguous()
    qy = torch.arange(N).repeat_interleave(Q).expand(T, -1).contiguous()
    return sx, sy, qx, qy


@pytest.mark.parametrize("per_pass", [1, 2, 4])
def test_query_passes_by_hand(per_pass):
    """``--queries-per-pass K``: each task's queries go through the adapted network in balanced passes
    of K per class (BatchNorm normalizes with each pass's statistics). By hand: 2 SGD steps per task,
    then, for pass i, the queries i*K..(i+1)*K-1 *of each label* (found by label, not by position)
    through ``functional_call``; the accuracy and mean cross-entropy over all queries. A pass that
    took K*N consecutive queries (unbalanced classes) fails this."""
    torch.manual_seed(55)
    model = _bn_classifier()
    T, N, K, Q = 3, 3, 2, 4
    sx, sy, qx, qy = _episode_batch(T, N, K, Q, seed=55)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2)
    names = list(learner.adapted_names)
    sizes = [p.numel() for n, p in model.named_parameters() if n in names]
    rates = rate_table("scalar", torch.tensor(0.3, dtype=torch.float64), 2, sizes)
    acc, loss = ev.query_passes(learner, sx, sy, qx, qy, N, per_pass, steps=2)
    for t in range(T):
        fast = hand_adapt(model, names, sx[t], sy[t], 2, rates)[-1]
        correct, ce = 0, 0.0
        of_label = [torch.nonzero(qy[t] == c).flatten() for c in range(N)]
        for i in range(0, Q, per_pass):
            idx = torch.cat([rows[i:i + per_pass] for rows in of_label])
            with torch.no_grad():
                pred = functional_call(model, fast, (qx[t, idx],))
            correct += int((pred.argmax(-1) == qy[t, idx]).sum())
            ce += float(F.cross_entropy(pred, qy[t, idx], reduction="sum"))
        assert float(acc[t]) == correct / (N * Q)
        assert float(loss[t]) == pytest.approx(ce / (N * Q), rel=1e-12)


def test_query_passes_of_all_queries_is_evaluate_and_smaller_passes_differ():
    """One pass of all Q queries per class is exactly ``MAML.evaluate``; passes of 1 per class give
    other losses (the batch statistics change), which is what the option is for."""
    torch.manual_seed(56)
    T, N, K, Q = 4, 3, 1, 6
    sx, sy, qx, qy = _episode_batch(T, N, K, Q, seed=56)
    learner = fastmaml.MAML(_bn_classifier(), inner_lr=0.3, inner_steps=1)
    out = learner.evaluate(sx, sy, qx, qy, steps=3)
    acc, loss = ev.query_passes(learner, sx, sy, qx, qy, N, Q, steps=3)
    torch.testing.assert_close(acc, out.task_accuracy.double(), rtol=0, atol=0)
    torch.testing.assert_close(loss, out.task_losses.double(), rtol=1e-14, atol=0)
    _, loss1 = ev.query_passes(learner, sx, sy, qx, qy, N, 1, steps=3)
    assert (loss1 - loss).abs().min() > 1e-6
    with pytest.raises(UserError, match=r"--queries-per-pass 4: expected a divisor of the queries per class \(6\)"):
        ev.query_passes(learner, sx, sy, qx, qy, N, 4, steps=3)


def test_cli_eval_queries_per_pass_checks(tmp_path, capsys):
    """``fastmaml eval --queries-per-pass``: refused for sinusoid and when it does not divide
    --queries (one line naming both); recorded in eval.json."""
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "sinusoid-tiny", "--out", str(run), "--threads", "1", "--quiet", "--set",
                         "iterations=1", "val_every=0"]) == 0
        capsys.readouterr()
        assert cli.main(["eval", str(run), "--episodes", "2", "--queries-per-pass", "1", "--quiet"]) == 2
        assert "--queries-per-pass: only for classification runs" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_summary_line_names_the_query_passes():
    base = {"config": "omniglot-5w1s", "iteration": 60000, "split": "test", "episodes": 600, "steps": 10,
            "accuracy": 0.9933, "accuracy_ci95": 0.0015, "queries": 15}
    assert ev.summary_line(dict(base, queries_per_pass=15)).endswith(
        "(95% CI over 600 episodes); all 15 queries per class in one pass.")
    assert ev.summary_line(dict(base, queries_per_pass=1)).endswith(
        "99.33% ± 0.15% (95% CI over 600 episodes); queries in passes of 1 per class.")


def test_queries_per_pass_default_is_the_training_passes():
    """``fastmaml eval``'s default passes: the config's ``queries`` per class (the batch statistics of
    meta-training) when it divides the evaluation's queries, else one pass; ``all`` is one pass; a
    non-divisor is refused naming both numbers; sinusoid has no passes."""
    qpp = ev.resolve_queries_per_pass
    assert qpp(None, configs.get("omniglot-5w1s"), 15) == 1
    assert qpp(None, configs.get("omniglot-5w5s"), 15) == 5
    assert qpp(None, configs.get("omniglot-20w5s"), 10) == 5
    assert qpp(None, configs.get("omniglot-5w5s"), 7) == 7           # 5 does not divide 7: one pass
    assert qpp(None, configs.get("reptile-omniglot-5w1s"), 15) == 15  # queries=9, an inner batch
    assert qpp("all", configs.get("omniglot-5w1s"), 15) == 15
    assert qpp(3, configs.get("omniglot-5w1s"), 15) == 3
    with pytest.raises(UserError, match=r"--queries-per-pass 4: expected a divisor of --queries \(15 per class\) "
                       r"or 'all'"):
        qpp(4, configs.get("omniglot-5w1s"), 15)
    assert qpp(None, configs.get("sinusoid"), 100) == 100
    assert qpp("all", configs.get("sinusoid"), 100) == 100
    with pytest.raises(UserError, match="only for classification runs"):
        qpp(10, configs.get("sinusoid"), 100)


def test_cli_queries_per_pass_argument():
    """``--queries-per-pass`` takes a positive int or ``all``; anything else is refused by argparse
    naming what was given."""
    assert ev._per_pass("all") == "all" and ev._per_pass("5") == 5
    for bad in ("0", "-1", "x", "ALL", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a positive int or 'all', got '{bad}'"):
            ev._per_pass(bad)
