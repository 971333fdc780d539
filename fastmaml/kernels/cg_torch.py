"""The torch implementation (backend ``torch``) of the batched conjugate-gradient vector updates (implicit MAML).

T systems, one per task, are rows of [T, P] buffers; ``alpha`` and ``beta`` are [T] (0 for a task
whose system has converged: its ``x`` and ``r`` then stay as they are).

* ``cg_step(x, r, p, Ap, alpha) -> (x + alpha p, r - alpha Ap, ||r_new||^2 per row)``
* ``cg_direction(r, p, beta) -> r + beta p``

The C++ kernels (``csrc/cpu/cg.cpp``) must match these.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor


def cg_step(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    a = alpha[:, None]
    r_new = r - a * Ap
    return x + a * p, r_new, (r_new * r_new).sum(1)


def cg_direction(r: Tensor, p: Tensor, beta: Tensor) -> Tensor:
    return r + beta[:, None] * p
