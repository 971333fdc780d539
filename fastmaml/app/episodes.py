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

if TYPE_CHECKING:  # numpy and torch are imported where used: `fastmaml eval --help` imports this module
    import torch

__all__ = ["fixed_episodes", "run_episodes", "mean_ci95"]


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


def run_episodes(learner, episodes, steps: int, classification: bool) -> Tuple[List[float], List[float]]:
    """Per-episode query losses and accuracies after ``steps`` inner steps."""
    losses: List[float] = []
    accs: List[float] = []
    for sx, sy, qx, qy in episodes:
        out = learner.evaluate(sx, sy, qx, qy, steps=steps)
        losses.extend(out.task_losses.double().cpu().tolist())
        if classification and out.task_accuracy is not None:
            accs.extend(out.task_accuracy.double().cpu().tolist())
    return losses, accs
