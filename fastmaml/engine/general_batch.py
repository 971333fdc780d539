"""Task batches beyond one tensor: several model inputs, pytree targets, losses run per task.

The generic runner's general variant (:class:`fastmaml.engine.generic_runner.GeneralRunner`) reads
its inputs and targets through these: ``TaskInputs`` holds several inputs [T, N, ...] (the model is
called as ``model(*items)``), targets are any pytree of [T, ...] tensors, and
:func:`general_task_losses` calls ``loss_fn(pred_t, batch_t)`` per task, vectorized by
``torch.func.vmap`` when the loss allows it, else task after task. Public through
:mod:`fastmaml.functional_api` (issue 11, item 2).
"""

from __future__ import annotations

import warnings
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from ..functional import TaskBatchedModel, is_classification


# -- several inputs -----------------------------------------------------------------------------
class TaskInputs:
    """Several model inputs, each [T, N, ...], passed to the model as ``model(*items)``.

    A pytree node (vmap and autograd see the tensors); ``shape`` is the first input's shape and
    ``x[t]`` is task t's inputs, which is all the engine's generic path asks of an input."""

    __slots__ = ("items",)

    def __init__(self, items) -> None:
        self.items = tuple(items)

    @property
    def shape(self) -> torch.Size:
        return self.items[0].shape

    @property
    def device(self) -> torch.device:
        return self.items[0].device

    def __getitem__(self, t) -> "TaskInputs":
        return TaskInputs(i[t] for i in self.items)


pytree.register_pytree_node(TaskInputs, lambda b: (list(b.items), None), lambda items, _: TaskInputs(items))


def is_general(x, y=None) -> bool:
    """Inputs or targets that only the general engine takes (several inputs, pytree targets)."""
    return not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor))


def as_inputs(x):
    if isinstance(x, (tuple, list)):
        if not x or not all(isinstance(i, Tensor) for i in x):
            raise TypeError("several model inputs must be a non-empty tuple of tensors [T, N, ...]")
        return TaskInputs(x)
    return x


def num_tasks(tree) -> int:
    leaves = [l for l in pytree.tree_leaves(tree) if isinstance(l, Tensor)]
    if not leaves:
        raise TypeError("the task batch holds no tensor")
    T = leaves[0].shape[0] if leaves[0].dim() else None
    for l in leaves:
        if l.dim() == 0 or l.shape[0] != T:
            raise ValueError(f"every tensor of the task batch must be task-batched [T, ...] with one T; got shapes "
                             f"{[tuple(l.shape) for l in leaves]}")
    return T


class GeneralBatchedModel(TaskBatchedModel):
    """TaskBatchedModel whose inputs may be several tensors per example (``TaskInputs``)."""

    def _one_task(self, params: Dict[str, Tensor], x) -> Tensor:
        args = x.items if isinstance(x, TaskInputs) else (x,)
        return functional_call(self.model, params, args)


def _task(tree, t: int):
    return pytree.tree_map(lambda l: l[t] if isinstance(l, Tensor) else l, tree)


def general_task_losses(pred: Tensor, y, loss_fn, cache: Dict[int, str]) -> Tensor:
    """[T]: ``loss_fn(pred[t], y_t)`` per task, vmapped when the loss allows it, else in a loop."""
    if loss_fn is None:
        if not isinstance(y, Tensor):
            raise TypeError("targets other than one tensor need a loss_fn(pred, batch) that reads them")
        T = pred.shape[0]
        if is_classification(y):
            return F.cross_entropy(pred.flatten(0, 1), y.flatten(), reduction="none").view(T, -1).mean(1)
        return (pred - y).pow(2).flatten(1).mean(1)
    key = id(loss_fn)
    if cache.get(key) != "loop":
        try:
            out = vmap(loss_fn)(pred, y)
            _check_scalar(out, pred.shape[0], "vmap")
            cache[key] = "vmap"
            return out
        except Exception as e:  # noqa: BLE001 - any failure of vmap: try the loss task by task
            if cache.get(key) == "vmap":
                raise
            vmap_error = e
    else:
        vmap_error = None
    try:
        out = torch.stack([_scalar(loss_fn(pred[t], _task(y, t))) for t in range(pred.shape[0])])
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"loss_fn cannot be batched over tasks: torch.func.vmap failed ({type(vmap_error).__name__}: "
            f"{vmap_error}) and so did calling it on one task ({type(e).__name__}: {e}); loss_fn(pred, batch) "
            "gets one task's predictions [N, ...] and that task's slice of the targets, and must return a "
            "0-d tensor") from e
    if key not in cache:
        warnings.warn(f"loss_fn runs task after task (torch.func.vmap cannot run it: {type(vmap_error).__name__}: "
                      f"{vmap_error}); avoid data-dependent Python control flow and .item() to batch it",
                      stacklevel=4)
        cache[key] = "loop"
    return out


def _scalar(v) -> Tensor:
    if not isinstance(v, Tensor) or v.dim() != 0:
        raise ValueError(f"loss_fn must return a 0-d tensor per task, got "
                         f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    return v


def _check_scalar(out, T: int, how: str) -> None:
    if not isinstance(out, Tensor) or tuple(out.shape) != (T,):
        raise ValueError(f"loss_fn must return a 0-d tensor per task; under {how} it gave "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
