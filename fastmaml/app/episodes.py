"""Fixed evaluation episodes and their statistics: what validation (``fastmaml train``) and test
evaluation (``fastmaml eval``) share.

An episode batch is ``(sx, sy, qx, qy)`` with a leading task dimension T. :func:`run_episodes`
adapts to each task's support set for ``steps`` inner steps and returns the per-task query losses
and accuracies; :func:`mean_ci95` summarizes them as the mean and the half-width of its 95%
confidence interval.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

from .errors import UserError

if TYPE_CHECKING:  # numpy and torch are imported where used: `fastmaml eval --help` imports this module
    import torch

__all__ = ["fixed_episodes", "run_episodes", "query_passes", "training_passes", "mean_ci95"]


def fixed_episodes(ds, n: int, batch: int, seed: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """``n`` episodes fixed by ``seed`` (the same every call, whatever the sampler's state), ``batch``
    at a time."""
    return ds.episodes(n, batch=batch, seed=seed)


def mean_ci95(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """The mean and the half-width of its 95% confidence interval, ``1.96 * s / sqrt(n)`` with ``s``
    the sample standard deviation (``ddof=1``); None for fewer than 2 values."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("mean_ci95 of no values")
    mean = float(a.mean())
    if a.size < 2:
        return mean, None
    return mean, float(1.96 * a.std(ddof=1) / math.sqrt(a.size))


def training_passes(config, queries: int) -> int:
    """The query images per class in each forward pass when evaluating ``queries`` per class: the
    config's ``queries`` (the batch statistics the run was meta-trained with) when it divides
    ``queries``, else all of them in one pass (Reptile's configs, whose ``queries`` is an inner batch).
    The default of ``fastmaml eval`` and what validation during training uses."""
    return config["queries"] if queries % config["queries"] == 0 else queries


def run_episodes(learner, episodes, steps: int, classification: bool, ways: Optional[int] = None,
                 per_pass: Optional[int] = None) -> Tuple[List[float], List[float]]:
    """Per-episode query losses and accuracies after ``steps`` inner steps; a classification task's
    queries ``per_pass`` per class at a time (:func:`query_passes`; None or all of them: one pass, by
    ``learner.evaluate``)."""
    losses: List[float] = []
    accs: List[float] = []
    for sx, sy, qx, qy in episodes:
        if per_pass is not None and per_pass * ways != qy.shape[1]:
            acc, loss = query_passes(learner, sx, sy, qx, qy, ways, per_pass, steps)
            losses.extend(loss.cpu().tolist())
            accs.extend(acc.cpu().tolist())
            continue
        out = learner.evaluate(sx, sy, qx, qy, steps=steps)
        losses.extend(out.task_losses.double().cpu().tolist())
        if classification and out.task_accuracy is not None:
            accs.extend(out.task_accuracy.double().cpu().tolist())
    return losses, accs


def query_passes(learner, sx, sy, qx, qy, ways: int, per_pass: int, steps: int):
    """(accuracy [T], mean cross-entropy [T]) of every task's queries, sent through the adapted network
    ``per_pass`` per class at a time.

    The sampler lays the queries out class-major (``qy = [0]*Q + [1]*Q + ...``), so pass i takes
    queries ``i*per_pass .. (i+1)*per_pass - 1`` of every class: each pass is a balanced N-way batch,
    as a training query set of ``per_pass`` queries per class is. ``per_pass`` must divide Q."""
    import torch
    import torch.nn.functional as F

    T, M = qy.shape[:2]
    Q = M // ways
    if Q * ways != M or Q % per_pass:
        raise UserError(f"--queries-per-pass {per_pass}: expected a divisor of the queries per class ({Q})")
    fast = learner.adapt(sx, sy, steps=steps)
    by_class_x = qx.reshape(T, ways, Q, *qx.shape[2:])
    by_class_y = qy.reshape(T, ways, Q)
    correct = torch.zeros(T, dtype=torch.float64, device=qy.device)
    loss_sum = torch.zeros(T, dtype=torch.float64, device=qy.device)
    with torch.no_grad():
        for i in range(0, Q, per_pass):
            x = by_class_x[:, :, i:i + per_pass].reshape(T, ways * per_pass, *qx.shape[2:])
            y = by_class_y[:, :, i:i + per_pass].reshape(T, ways * per_pass)
            logits = learner.predict(fast, x)
            correct += (logits.argmax(-1) == y).sum(1).double()
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            loss_sum += ce.view(T, -1).double().sum(1)
    return correct / M, loss_sum / M
