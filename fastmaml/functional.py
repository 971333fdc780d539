"""Running a model on many tasks at once, and the per-task losses.

``TaskBatchedModel`` evaluates one ``nn.Module`` with T different sets of adapted parameters on T
different inputs in one batched computation (``torch.func.vmap`` over ``functional_call``);
parameters that are not adapted are shared by all tasks.

BatchNorm follows the MAML paper: statistics of the current batch, per task, in training and in
evaluation alike (transductive); running statistics are neither read nor updated. With
``keep_eval=True`` (``MAML(bn_stats="running")``, :mod:`fastmaml.bn_running`) BatchNorm modules in
evaluation mode normalize with their running statistics instead; none is updated here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .layout import FlatLayout

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def batch_statistics(model: nn.Module, keep_eval: bool = False) -> Iterator[None]:
    """Make every BatchNorm of ``model`` normalize with the current batch's statistics, updating no
    running statistics. ``keep_eval``: leave the BatchNorm modules in evaluation mode that track
    running statistics as they are (they normalize with those, and update nothing)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if keep_eval and not m.training and m.track_running_stats:
                continue
            saved.append((m, m.training, m.track_running_stats))
            m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training, m.track_running_stats = training, track


def is_classification(y: Tensor) -> bool:
    return not (y.is_floating_point() or y.is_complex())


def default_loss(y: Tensor) -> LossFn:
    """Cross-entropy for integer labels, mean squared error for float targets."""
    return F.cross_entropy if is_classification(y) else F.mse_loss


def task_losses(pred: Tensor, y: Tensor, loss_fn: Optional[LossFn]) -> Tensor:
    """[T]: ``loss_fn(pred[t], y[t])`` for every task t."""
    T = pred.shape[0]
    if loss_fn is None and is_classification(y):
        return F.cross_entropy(pred.flatten(0, 1), y.flatten(), reduction="none").view(T, -1).mean(1)
    if loss_fn is None:
        return (pred - y).pow(2).flatten(1).mean(1)
    return vmap(loss_fn)(pred, y)


def task_accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """[T]: fraction of correct argmax predictions per task."""
    return (pred.argmax(-1) == y).to(pred.dtype).mean(1)


BATCHING = ("auto", "vmap", "loop")


class TaskBatchedModel:
    """``forward(flat, x)``: the model with adapted parameters ``flat`` ([P] shared or [T, P]) on
    inputs ``x`` [T, N, ...], giving [T, N, ...] outputs.

    ``batching``: 'vmap' runs all tasks as one batched computation (``torch.func.vmap`` over
    ``functional_call``: a convolution becomes one grouped convolution); 'loop' runs the tasks one
    after another, each on its own rows of ``flat``; either way the result is one tensor and one
    autograd graph. 'auto' takes vmap, except for convolutional models on the CPU: there vmap turns
    each convolution into a grouped one, whose CPU backward is slower than T plain ones (measured
    in bench/bench_meta_step.py), while for an MLP vmap's batched matmuls win several-fold.
    """

    # MAML(bn_stats="running"): BatchNorm modules in evaluation mode use their running statistics
    bn_keep_eval = False

    def __init__(self, model: nn.Module, layout: FlatLayout, batching: str = "auto") -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.model = model
        self.layout = layout
        self.batching = batching
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())

    def resolved_batching(self, device: torch.device) -> str:
        """'vmap' or 'loop': what ``batching`` means on ``device``."""
        if self.batching != "auto":
            return self.batching
        return "loop" if device.type == "cpu" and self._has_conv else "vmap"

    def _one_task(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        if flat.dim() == 1:
            flat = flat.expand(x.shape[0], -1)
        batching = self.resolved_batching(flat.device)
        with batch_statistics(self.model, self.bn_keep_eval):
            if batching == "vmap":
                return vmap(self._one_task)(self.layout.views(flat), x)
            # unbind, then split each row: backward assembles [T, P] once (indexing [T, P] per
            # tensor per task would allocate a zero-filled [T, P] for each, O(T^2 P) in all)
            return torch.stack([
                self._one_task(self.layout.views(row), x[t]) for t, row in enumerate(flat.unbind(0))
            ])
