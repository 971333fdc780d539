"""The differentiable, task-batched functional API (issue 11, items 1 and 2).

``fast = learner.adapt(sx, sy, steps=K, create_graph=True)`` returns fast weights whose ``flat``
[T, P] hangs from the meta-parameters (the adapted ones, the learnable inner rates, and the
parameters that the inner loop does not adapt) through :class:`AdaptFunction`: its forward is
``Engine.inner_loop`` and its backward ``Engine.reverse`` (docs/design.md, "The meta-gradient"), so no
unrolled graph is kept and memory is bounded by the store budget, not by K. ``learner(fast, x)`` runs every task's adapted model with autograd,
so any outer objective built from the outputs can be ``backward()``-ed.

General losses (item 2): the inputs may be one tensor [T, N, ...] or a tuple of them (a model with
several inputs); the targets any pytree (tensor, tuple, dict) of [T, ...] tensors (targets with masks
for ragged tasks, extra per-task data); ``loss_fn(pred_t, batch_t)`` is called per task and vectorized
with ``torch.func.vmap``; a loss that vmap cannot run runs task after task (with a warning), and one
that fails per task too raises an error that names both failures. ``nn.CrossEntropyLoss()`` and
``nn.MSELoss()`` with their default settings are the built-in losses (:func:`resolve_loss`), which
keeps the engine's fused path.
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .engine import Engine
from .functional import TaskBatchedModel, is_classification

__all__ = ["AdaptFunction", "TaskInputs", "resolve_loss", "is_general", "num_tasks"]


# -- losses -------------------------------------------------------------------------------------
def resolve_loss(loss_fn, y=None):
    """``None`` (the built-in loss, and the fused path) for ``nn.CrossEntropyLoss()`` with int labels
    and ``nn.MSELoss()`` with float targets in their default settings; anything else unchanged."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        default = (loss_fn.reduction == "mean" and loss_fn.weight is None and loss_fn.label_smoothing == 0.0)
        if default and (y is None or (isinstance(y, Tensor) and is_classification(y))):
            return None
    elif isinstance(loss_fn, nn.MSELoss):
        if loss_fn.reduction == "mean" and (y is None or (isinstance(y, Tensor) and y.is_floating_point())):
            return None
    return loss_fn


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


class _GeneralBatchedModel(TaskBatchedModel):
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


class GeneralEngine(Engine):
    """The engine on the generic path for several inputs, pytree targets and losses that run per task.

    Only the two places where the generic path reads its inputs change (the batched forward and the
    losses); the inner loop and the reverse pass are the engine's."""

    def __init__(self, model, layout, inner_lr, kernel_backend=None, batching: str = "auto") -> None:
        super().__init__(model, layout, inner_lr, kernel_backend, batching if batching in ("vmap", "loop") else "auto")
        self.batched = _GeneralBatchedModel(model, layout, self.batched.batching)
        self.fused = None
        self.fallback_reason = "several inputs, targets other than one tensor, or a loss that vmap cannot run"
        self._loss_modes: Dict[int, str] = {}

    def _losses(self, flat, x, y, loss_fn):
        pred = self.batched.forward(flat, x)
        return general_task_losses(pred, y, loss_fn, self._loss_modes), pred

    def support_grad(self, theta_k, x, y, loss_fn, create_graph, grad_out=None):
        if theta_k.dim() == 1:
            theta_k = theta_k.expand(x.shape[0], -1)
        return super().support_grad(theta_k, x, y, loss_fn, create_graph, grad_out=grad_out)


# -- the autograd.Function ----------------------------------------------------------------------
class _Pending:
    """What the forward leaves for the backward (held outside ctx so the backward can release it)."""

    __slots__ = ("engine", "loop", "adapted", "shared_names", "learn_lr", "observe")

    def __init__(self, engine, adapted, shared_names, learn_lr, observe=None):
        self.engine, self.loop = engine, None
        self.adapted, self.shared_names, self.learn_lr = adapted, shared_names, learn_lr
        self.observe = observe  # the inner loop's observe(k, theta_k) (BatchNorm running statistics)


class AdaptFunction(torch.autograd.Function):
    """theta_K [T, P] = inner_loop(theta, lr, phi); backward: ``Engine.reverse`` (one use).

    Inputs: (pending, args, lr, *adapted params in layout order, *shared params)."""

    @staticmethod
    def forward(ctx, pending: _Pending, args: Tuple, lr: Tensor, *params: Tensor) -> Tensor:
        sx, sy, steps, first_order, loss_fn, memory = args
        with torch.enable_grad():
            loop = pending.engine.inner_loop(sx, sy, steps, first_order, loss_fn, memory, observe=pending.observe)
        pending.loop = loop
        ctx.pending = pending
        return loop.theta_K.contiguous().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, v: Tensor):
        pending = ctx.pending
        loop, pending.loop = pending.loop, None
        if loop is None:
            raise RuntimeError(
                "backward through adapt(create_graph=True)'s fast weights ran twice: the engine's reverse pass "
                "releases what the inner loop stored. Build one outer objective from the fast weights and call "
                "backward() once (retain_graph does not keep the inner loop), or call adapt again")
        with torch.enable_grad():
            theta_grad, shared, lr_grad = pending.engine.reverse(loop, v.contiguous())
        layout = pending.engine.layout
        adapted = [g.reshape(s) for g, s in zip(layout.views(theta_grad).values(), layout.shapes)]
        shared_grads = [shared.get(n) for n in pending.shared_names]
        return (None, None, lr_grad if pending.learn_lr else None, *adapted, *shared_grads)


def adapt_with_graph(learner, engine: Engine, sx, sy, steps: int, loss_fn, memory: str,
                     observe=None) -> Tuple[Tensor, Tensor]:
    """(fast flat [T, P] connected to the meta-parameters, support losses [K, T]). ``observe(k,
    theta_k)`` sees the inner loop's iterates (``Engine.inner_loop``; not the backward's
    recomputations): ``MAML(bn_stats="running")`` records BatchNorm statistics with it."""
    params = dict(learner.model.named_parameters())
    adapted = [params[n] for n in learner.layout.names]
    shared = engine.shared_params()
    T = num_tasks(sx)
    if steps == 0:
        flat = learner.layout.flatten(adapted).unsqueeze(0).expand(T, -1)
        return flat, torch.empty(0, T, dtype=flat.dtype, device=flat.device)
    lr = learner.inner_lr.lr
    pending = _Pending(engine, adapted, list(shared.keys()), learner.inner_lr.learnable, observe)
    args = (sx, sy, steps, learner.first_order, loss_fn, memory)
    flat = AdaptFunction.apply(pending, args, lr, *adapted, *shared.values())
    losses = pending.loop.support_losses if pending.loop is not None else None
    return flat, losses
