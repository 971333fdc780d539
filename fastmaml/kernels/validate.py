"""Argument checks for the fused ops: every message names the op, the argument, what was expected
and what was given. Checks run before any kernel, so a rejected call writes nothing."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_data(op: str, name: str, t: Tensor, ref: Tensor, allow_1d: bool = True) -> None:
    """``t`` is a floating tensor of ``ref``'s dtype and device, shaped [P] or [T, P] like ``ref``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fastmaml.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastmaml.{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dtype != ref.dtype:
        raise TypeError(f"fastmaml.{op}: {name} must have dtype {ref.dtype} (like the first argument), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"fastmaml.{op}: {name} is on {t.device}, but the first argument is on {ref.device}")
    P = ref.shape[-1]
    if t.dim() not in ((1, 2) if allow_1d else (2,)) or t.shape[-1] != P:
        want = f"[T, {P}] or [{P}]" if allow_1d else f"[T, {P}]"
        raise ValueError(f"fastmaml.{op}: {name} must have shape {want}, got {_shape(t)}")


def check_tasks(op: str, names: Sequence[str], tensors: Sequence[Optional[Tensor]]) -> None:
    """All 2-D tensors among ``tensors`` agree on the number of tasks T."""
    seen = [(n, t) for n, t in zip(names, tensors) if t is not None and t.dim() == 2]
    for n, t in seen[1:]:
        if t.shape[0] != seen[0][1].shape[0]:
            raise ValueError(
                f"fastmaml.{op}: {n} has {t.shape[0]} tasks (shape {_shape(t)}) but "
                f"{seen[0][0]} has {seen[0][1].shape[0]} (shape {_shape(seen[0][1])})"
            )


def check_lr(op: str, lr: Tensor, segments: Optional[Tensor], ref: Tensor, check_range: bool = True) -> None:
    """``lr`` is 0-d, [S] with ``segments`` [P] of ids in [0, S), or [P] without segments."""
    if not isinstance(lr, Tensor):
        raise TypeError(f"fastmaml.{op}: lr must be a Tensor, got {type(lr).__name__}")
    if lr.dtype != ref.dtype:
        raise TypeError(f"fastmaml.{op}: lr must have dtype {ref.dtype} (like the data), got {lr.dtype}")
    if lr.device != ref.device:
        raise ValueError(f"fastmaml.{op}: lr is on {lr.device}, but the data is on {ref.device}")
    P = ref.shape[-1]
    if lr.dim() == 0:
        return
    if lr.dim() != 1:
        raise ValueError(
            f"fastmaml.{op}: lr must be 0-d (scalar), [S] (per segment, with segments) or [{P}] "
            f"(per element), got {_shape(lr)}"
        )
    if segments is None:
        if lr.shape[0] != P:
            raise ValueError(
                f"fastmaml.{op}: lr of shape {_shape(lr)} without segments is per element and must "
                f"have shape [{P}]; pass segments for a per-segment lr"
            )
        return
    if not isinstance(segments, Tensor) or segments.dtype != torch.int64:
        got = segments.dtype if isinstance(segments, Tensor) else type(segments).__name__
        raise TypeError(f"fastmaml.{op}: segments must be an int64 tensor, got {got}")
    if segments.device != ref.device:
        raise ValueError(f"fastmaml.{op}: segments is on {segments.device}, but the data is on {ref.device}")
    if segments.shape != (P,):
        raise ValueError(f"fastmaml.{op}: segments must have shape [{P}], got {_shape(segments)}")
    if check_range and P > 0:
        lo, hi = int(segments.min()), int(segments.max())
        if lo < 0 or hi >= lr.shape[0]:
            raise ValueError(
                f"fastmaml.{op}: segment ids must lie in [0, {lr.shape[0]}) for lr of shape "
                f"{_shape(lr)}, got ids in [{lo}, {hi}]"
            )
