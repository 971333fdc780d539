"""The torch implementation of the flat-layout fused ops (backend ``torch``), in plain PyTorch.

These functions define the semantics that every other backend (C++ CPU, CUDA, Triton) must
match. They are written for clarity, not speed, and are differentiable by ordinary autograd.

Layout (docs/design.md §3.1): the fast weights of T tasks live in one flat buffer ``[T, P]``;
meta-parameters are ``[P]``. A learning rate ``lr`` takes one of three forms, decided by its
shape and by whether ``segments`` is given:

* scalar      ``lr.shape == ()``                                ``segments`` is ignored
* per segment ``lr.shape == (S,)`` and ``segments`` is given    ``segments``: int64 ``[P]``, ids in ``[0, S)``
* per element ``lr.shape == (P,)`` and ``segments`` is None

``lr_of(lr, segments)`` expands any form to the per-element vector ``a`` of shape ``[P]`` (or a
0-d tensor for the scalar form); all the math below is written with that ``a``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def lr_of(lr: Tensor, segments: Optional[Tensor]) -> Tensor:
    """The per-element learning rate ``a``: ``lr`` (0-d), ``lr[segments]`` ([P]) or ``lr`` ([P])."""
    if lr.dim() == 0:
        return lr
    if segments is not None:
        return lr[segments]
    return lr


def reduce_like(x: Tensor, lr: Tensor, segments: Optional[Tensor]) -> Tensor:
    """Sum ``x`` ([P] or [T, P]) into the shape of ``lr``: over tasks, then over each segment.

    The adjoint of ``lr_of``: ``sum(reduce_like(x) * lr) == sum(x * lr_of(lr))`` for [P] inputs.
    """
    if x.dim() == 2:
        x = x.sum(0)
    if lr.dim() == 0:
        return x.sum()
    if segments is not None:
        return torch.zeros_like(lr).index_add(0, segments, x)
    return x


def inner_update(theta: Tensor, grad: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    """One SGD step for every task: ``theta - a * grad``.

    theta: [P] (shared by all tasks, broadcast) or [T, P]; grad: [P] or [T, P];
    result: the broadcast shape of the two, [T, P] when either is [T, P].
    """
    return theta - lr_of(lr, segments) * grad


def scale(v: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    """``a * v`` for v of shape [P] or [T, P]: the input ``u = a_k v`` of the Hessian-vector product."""
    return lr_of(lr, segments) * v


def segment_dot(a: Tensor, b: Tensor, lr: Tensor, segments: Optional[Tensor] = None) -> Tensor:
    """``sum_t sum_{p in s} a[t, p] * b[t, p]`` for every entry s of ``lr``: a result shaped like ``lr``.

    ``lr`` only supplies the form (scalar, per segment, per element); its values are not read.
    a, b: [P] or [T, P] of one shape.
    """
    return reduce_like(a * b, lr, segments)


def reverse_step(
    v: Tensor,
    hv: Optional[Tensor],
    g: Tensor,
    gq: Optional[Tensor],
    w: float,
    lr: Tensor,
    segments: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One step of the explicit reverse pass (docs/design.md §2), for all tasks at once.

    v, hv, g, gq: [T, P]. ``hv = H_S(theta_k) (a_k v)`` (None for first order),
    ``g = grad L_S(theta_k)``, ``gq = grad L_Q(theta_k)`` (None when ``w == 0``).
    Returns ``(v - hv + w * gq, d_lr)`` with ``d_lr = -segment_dot(v, g)`` shaped like ``lr``:
    the gradient of the objective with respect to this step's learning rate.
    """
    d_lr = -segment_dot(v, g, lr, segments)
    out = v if hv is None else v - hv
    if gq is not None and w != 0.0:
        out = out + w * gq
    elif out is v:
        out = v.clone()
    return out, d_lr
