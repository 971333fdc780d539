"""The inner step a model call belongs to, for layers that keep one parameter set per step.

MAML++ (Antoniou et al., ICLR 2019) gives each BatchNorm layer one weight/bias set per inner step
(:class:`fastmaml.models.PerStepBatchNorm`). Which set a forward uses depends on where in the inner
loop it runs, which the layer cannot see; the engine says it through this context:

=====================================================  ==========
forward                                                step
=====================================================  ==========
support set at theta_k (inner step k = 0..K-1)         k
query set after k updates, theta_k (k = 1..K)          k - 1
query set at theta_0 (``adapt(steps=0)``)              0
=====================================================  ==========

so the query pass after the (k+1)-th update shares set k with the support pass that made that update,
as in the MAML++ code (``num_step`` is passed to both). :func:`query_step` is this table's query rows.
A layer with S sets uses set ``min(step, S - 1)``: more inner steps than sets (for example more test
steps than training steps) reuse the last set.

``with inner_step(k): ...`` sets the step for the code inside (a ``contextvars.ContextVar``: nested
contexts restore the outer step on exit, and threads do not see each other's step);
:func:`current_step` reads it, ``None`` outside every context. The engine (``fastmaml.engine``) sets
it around every model call on the generic path and passes it to the fused path's runner; the
per-task oracle (``fastmaml.reference.maml``) sets it itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Iterator, Optional

__all__ = ["inner_step", "current_step", "query_step", "check_step", "weight_set"]

_STEP: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("fastmaml_inner_step", default=None)


def check_step(step, name: str = "step") -> int:
    """``step`` as an int >= 0, or a ValueError / TypeError naming ``name``."""
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"{name} must be an int >= 0 (the inner step), got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"{name} must be an int >= 0 (the inner step), got {step}")
    return int(step)


@contextlib.contextmanager
def inner_step(step: int) -> Iterator[int]:
    """Run the body as inner step ``step`` (an int >= 0)."""
    token = _STEP.set(check_step(step))
    try:
        yield step
    finally:
        _STEP.reset(token)


def current_step() -> Optional[int]:
    """The step set by the innermost :func:`inner_step`, or None outside every one."""
    return _STEP.get()


def query_step(updates: int) -> int:
    """The step of a query forward after ``updates`` inner updates: ``updates - 1``, and 0 for the
    unadapted meta-parameters (``updates = 0``)."""
    return max(check_step(updates, "updates") - 1, 0)


def weight_set(step: Optional[int], sets: int, what: str, hint: str) -> int:
    """The parameter set that a layer with ``sets`` per-step sets uses at ``step``: min(step, sets - 1).
    ``step`` None (no inner-step context) raises a RuntimeError naming ``what``, with ``hint`` (how
    to give the step there)."""
    if step is None:
        raise RuntimeError(
            f"{what} has one weight set per inner step ({sets}) and was called outside an inner-step context "
            f"(without an inner step): {hint}. The engine sets the step for MAML / MAML++; ANIL, Reptile and "
            "iMAML do not define one")
    return min(check_step(step), sets - 1)
