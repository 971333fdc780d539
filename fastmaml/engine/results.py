"""What the engine hands back: a meta-gradient (:class:`EngineResult`) and an inner loop waiting for
its reverse pass (:class:`InnerLoop`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import Tensor

from ..functional import LossFn


@dataclass
class EngineResult:
    objective: Tensor              # J (detached, 0-d)
    query_losses: Tensor           # [T] at theta_K
    query_accuracy: Optional[Tensor]
    support_losses: Tensor         # [K, T]
    query_losses_all: Tensor       # [K + 1, T]; NaN where the weight is 0
    theta_grad: Tensor             # [P] for the adapted parameters
    shared_grads: Dict[str, Tensor]  # the trainable parameters that are not adapted
    lr_grad: Optional[Tensor]


@dataclass
class InnerLoop:
    """What ``Engine.inner_loop`` leaves for ``Engine.reverse``."""

    steps: int
    first_order: bool
    memory: str
    loss_fn: Optional[LossFn]
    support_x: Tensor
    support_y: Tensor
    lr: Tensor
    ops: object
    c: int                      # checkpoint spacing (K in store mode)
    checkpoints: List[Tensor]   # store: theta_0..theta_{K-1}; recompute: every c-th iterate
    stored_grads: List[Optional[Tensor]]  # g_0..g_{K-1} (store) or [g_{K-1}] (recompute); None entries
                                          # unless kept (learned rates, or keep_grads=True)
    kept: Dict[int, object]     # step -> HVP state kept from the forward
    theta_K: Tensor             # [T, P], detached
    support_losses: Tensor      # [K, T]
    segment_budget: float = 0.0  # bytes of states the reverse pass may keep per recomputed segment
    runner: Optional[object] = None  # the Runner that ran the inner loop (the reverse pass uses it too)
