"""Argument and loss checks shared by the compat layers: fail early, name the argument or the call.

The libraries they mirror accept ``lr="0.01"`` (and fail later, deep inside a step) and take an inner
step on a NaN loss (every meta-gradient becomes NaN, nothing says which task did it). fastmaml's own
API refuses both; so do its compat layers.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn


def check_module(owner: str, name: str, model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: {name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_rate(owner: str, name: str, lr):
    """``lr`` unchanged if it is a real number (not a bool or a string) or a floating-point tensor, and
    finite; else an error naming ``owner`` and ``name``. Any sign is allowed, as in the libraries."""
    if isinstance(lr, Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"{owner}: {name} must be a number or a floating-point tensor, got a {lr.dtype} tensor")
        if not bool(torch.isfinite(lr.detach()).all()):
            raise ValueError(f"{owner}: {name} must be finite, got {lr}")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number (e.g. 0.01) or a floating-point tensor, "
                        f"got {lr!r} ({type(lr).__name__})")
    if not math.isfinite(float(lr)):
        raise ValueError(f"{owner}: {name} must be finite, got {lr!r}")
    return lr


def check_flag(owner: str, name: str, value, none_ok: bool = False):
    """``value`` if it is a bool (or None where allowed): a string like ``"False"`` is truthy and would
    silently select the other behaviour."""
    if (value is None and none_ok) or isinstance(value, bool):
        return value
    expected = "True, False or None" if none_ok else "True or False"
    raise TypeError(f"{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_loss(compat: str, loss, where: str, consequence: str) -> None:
    """A FloatingPointError naming ``where`` (which call of which task) when the inner loss has a NaN or
    an Inf; ``consequence`` says what the mirrored library would have done instead."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{compat}: the inner loss must be a tensor, got {type(loss).__name__} ({where})")
    if not bool(torch.isfinite(loss.detach()).all()):
        shown = loss.item() if loss.numel() == 1 else f"a tensor of shape {tuple(loss.shape)} with NaN/Inf"
        raise FloatingPointError(
            f"{compat}: non-finite inner loss {shown} given to {where}; {consequence}. Nothing was updated: "
            "check that task's support batch, the model's outputs and the learning rate")


class CallCounter:
    """Counts calls since some tensors last changed in place (their autograd version counters; an
    optimizer step bumps them): the n-th clone or inner loop since the meta-parameters changed is the
    n-th task of the current meta-batch, which an error message can name."""

    __slots__ = ("_versions", "count")

    def __init__(self) -> None:
        self._versions: Tuple[int, ...] = ()
        self.count = 0

    def next(self, tensors: Sequence[Tensor]) -> int:
        versions = tuple(t._version for t in tensors)
        if versions != self._versions:
            self._versions, self.count = versions, 0
        self.count += 1
        return self.count
