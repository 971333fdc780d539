"""The fused ops over the flat task-batched layout, with a selectable kernel backend.

A learning rate ``lr`` is 0-d (one value), ``[S]`` with ``segments`` (an int64 ``[P]`` tensor of
segment ids: one value per parameter tensor, for per-layer rates) or ``[P]`` without segments (one
value per element, Meta-SGD). ``a`` below is that rate expanded to ``[P]``.

* ``inner_update(theta, grad, lr, segments=None)``: ``theta - a * grad``, theta and grad [P] or [T, P]
* ``scale(v, lr, segments=None)``: ``a * v``
* ``segment_dot(a, b, lr, segments=None)``: sum over tasks and over each segment of ``a * b``, shaped like lr
* ``reverse_step(v, hv, g, gq, w, lr, segments=None)``: ``(v - hv + w * gq, -segment_dot(v, g))``

Each validates its arguments, then runs the backend chosen by :func:`set_backend` (or the
``FASTMAML_KERNELS`` environment variable) for the tensors' device. All are differentiable.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .backends import BACKENDS, available_backends, get_backend, implementation, probe, resolve, set_backend
from .validate import check_data, check_lr, check_tasks

__all__ = [
    "BACKENDS", "available_backends", "get_backend", "set_backend", "probe", "ops_for",
    "inner_update", "scale", "segment_dot", "reverse_step",
]


def ops_for(t: Tensor, backend: Optional[str] = None):
    """The four raw ops (no argument checks) serving tensors like ``t``: for callers such as the
    engine that validate once and then call many times."""
    return implementation(resolve(t.device, backend))


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def inner_update(theta: Tensor, grad: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    check_data("inner_update", "theta", theta, theta)
    check_data("inner_update", "grad", grad, theta)
    check_tasks("inner_update", ("theta", "grad"), (theta, grad))
    check_lr("inner_update", lr, segments, theta)
    return ops_for(theta).inner_update(_c(theta), _c(grad), _c(lr), _c(segments))


def scale(v: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    check_data("scale", "v", v, v)
    check_lr("scale", lr, segments, v)
    return ops_for(v).scale(_c(v), _c(lr), _c(segments))


def segment_dot(a: Tensor, b: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    check_data("segment_dot", "a", a, a)
    check_data("segment_dot", "b", b, a)
    if a.shape != b.shape:
        raise ValueError(f"fastmaml.segment_dot: a and b must have one shape, got {list(a.shape)} and {list(b.shape)}")
    check_lr("segment_dot", lr, segments, a)
    return ops_for(a).segment_dot(_c(a), _c(b), _c(lr), _c(segments))


def reverse_step(
    v: Tensor,
    hv: Optional[Tensor],
    g: Tensor,
    gq: Optional[Tensor],
    w: float,
    lr: Tensor,
    segments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    check_data("reverse_step", "v", v, v, allow_1d=False)
    for name, t in (("hv", hv), ("g", g), ("gq", gq)):
        if t is not None:
            check_data("reverse_step", name, t, v, allow_1d=False)
    check_tasks("reverse_step", ("v", "hv", "g", "gq"), (v, hv, g, gq))
    check_lr("reverse_step", lr, segments, v)
    return ops_for(v).reverse_step(_c(v), _c(hv), _c(g), _c(gq), float(w), _c(lr), _c(segments))
