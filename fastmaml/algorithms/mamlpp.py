"""MAML++'s training schedules (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML").

fastmaml's MAML already has LSLR (``lr_mode='per_layer_per_step'``, ``learn_lr=True``) and the
multi-step loss (``multi_step_weights``). This module adds what changes over training, as pure
functions of the iteration (so a resumed run follows the same schedule):

* derivative-order annealing (DA): first-order meta-gradients for the first ``first_order_iterations``
  iterations, second order afterwards;
* the multi-step loss annealing (MSL) of the MAML++ code (``get_per_step_loss_importance_vector``):
  the weights start uniform (1/K) and move, epoch by epoch, toward the last step; after
  ``msl_iterations`` only the last step's loss remains;
* cosine annealing of the meta learning rate (CA) from ``meta_lr`` to ``min_meta_lr`` over the run.

Per-step BatchNorm weights (BNWB) are a layer, :class:`fastmaml.models.PerStepBatchNorm` (``conv4`` /
``mlp_bn`` with ``per_step_bn=S``; the ``mamlpp-*`` configs turn it on with S = ``inner_steps``): one
scale/shift set per inner step, meta-learned and not adapted in the inner loop, as in the MAML++ code.
The support pass of inner step k uses set k and the query pass after k + 1 updates set k too
(:mod:`fastmaml.step_context`; steps beyond S - 1 use the last set). The engine's generic and fused
paths and the per-task oracle all run it. Normalization always uses the batch statistics, as the
MAML++ code does (``training=True``); its per-step running statistics (BNRS) are only tracked there,
never read, so they change nothing in training or evaluation and are not kept here.

:class:`MAMLPPSchedule` applies all three to a :class:`fastmaml.MAML` learner and its optimizer;
``fastmaml train`` calls it before every iteration (``before_iteration``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

__all__ = ["MAMLPPSchedule", "msl_weights", "cosine_lr", "EPOCH"]

EPOCH = 500  # iterations per "epoch" in the MAML++ code (total_iter_per_epoch)


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> List[float]:
    """The MAML++ code's per-step loss importance vector at ``epoch`` (0-based)."""
    K = steps
    w = np.ones(K) * (1.0 / K)
    decay = 1.0 / K / msl_epochs
    floor = 0.03 / K
    for i in range(K - 1):
        w[i] = max(w[i] - epoch * decay, floor)
    w[-1] = min(w[-1] + epoch * (K - 1) * decay, 1.0 - (K - 1) * floor)
    return [float(v) for v in w]


def cosine_lr(it: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine annealing from ``lr`` (iteration 1) to ``min_lr`` (iteration ``total``)."""
    if total <= 1:
        return lr
    frac = (it - 1) / (total - 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


@dataclass
class MAMLPPSchedule:
    """What MAML++ changes per iteration. ``iterations``: the run's length.

    first_order_iterations: DA: first order while ``it <= first_order_iterations`` (0: never).
    msl_iterations: MSL: the annealed multi-step loss while ``it <= msl_iterations`` (0: off).
    meta_lr, min_meta_lr: CA (``min_meta_lr=None``: constant meta learning rate).
    """

    iterations: int
    first_order_iterations: int = 0
    msl_iterations: int = 0
    meta_lr: float = 1e-3
    min_meta_lr: Optional[float] = None
    base_first_order: bool = False

    def __post_init__(self) -> None:
        for name in ("first_order_iterations", "msl_iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"MAML++: {name} must be an int >= 0, got {v!r}")
            if v > self.iterations:
                raise ValueError(f"MAML++: {name}={v} is beyond the run's {self.iterations} iterations (the "
                                 f"annealing would never end); lower it or raise iterations")
        if self.min_meta_lr is not None and not 0 <= self.min_meta_lr <= self.meta_lr:
            raise ValueError(f"MAML++: min_meta_lr must be in [0, meta_lr={self.meta_lr}], got {self.min_meta_lr}")

    def first_order(self, it: int) -> bool:
        return self.base_first_order or it <= self.first_order_iterations

    def weights(self, it: int, steps: int) -> Optional[List[float]]:
        if self.msl_iterations == 0 or it > self.msl_iterations or steps == 1:
            return None
        msl_epochs = max(1, -(-self.msl_iterations // EPOCH))
        return msl_weights(steps, (it - 1) // EPOCH, msl_epochs)

    def lr(self, it: int) -> float:
        if self.min_meta_lr is None:
            return self.meta_lr
        return cosine_lr(it, self.iterations, self.meta_lr, self.min_meta_lr)

    def apply(self, learner, optimizer, it: int) -> None:
        """Set the learner's derivative order and multi-step weights and the optimizer's lr for ``it``."""
        learner.first_order = self.first_order(it)
        learner.multi_step_weights = self.weights(it, learner.inner_steps)
        for group in optimizer.param_groups:
            group["lr"] = self.lr(it)
