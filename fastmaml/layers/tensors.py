"""Small tensor helpers shared by the layer families: optional tensors and the layouts they move between.

``None`` stands for an exact zero throughout the fused path (an input with no R-part, a weight the
direction does not move), so sums of optional terms go through :func:`add_opt`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

Opt = Optional[Tensor]


def add_opt(a: Opt, b: Opt) -> Opt:
    """a + b where None is an exact zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def to5(t: Tensor) -> Tensor:
    """BatchNorm input [T, N, C] / [T, N, C, L] / [T, N, C, H, W] as [T, N, C, H, W]."""
    while t.dim() < 5:
        t = t.unsqueeze(-1)
    return t


def rows(t: Opt) -> Opt:
    """A Linear's input [T, N, ..., F] as the [T, N * ..., F] rows the task-batched matmul takes
    (a Linear maps the last dimension only, as nn.Linear does on any input); a view when it can be."""
    return t if t is None or t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])


def unrows(t: Opt, shape: torch.Size) -> Opt:
    """A Linear's rows [T, M, F'] back to ``shape`` [T, N, ..., F] with F' in place of F."""
    return t if t is None or len(shape) == 3 else t.reshape(*shape[:-1], t.shape[-1])
