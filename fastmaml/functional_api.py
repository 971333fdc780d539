"""The differentiable, task-batched functional API (issue 11, items 1 and 2).

``fast = learner.adapt(sx, sy, steps=K, create_graph=True)`` returns fast weights whose ``flat``
[T, P] hangs from the meta-parameters (the adapted ones, the learnable inner rates, and the
parameters that the inner loop does not adapt) through :class:`AdaptFunction`: its forward is
``Engine.inner_loop`` and its backward ``Engine.reverse`` (docs/design.md §2), so no
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

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .engine import Engine
from .engine.general_batch import (GeneralBatchedModel, TaskInputs, as_inputs, general_task_losses,  # noqa: F401
                                   is_general, num_tasks)
from .functional import is_classification

_GeneralBatchedModel = GeneralBatchedModel  # the old private name

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


class GeneralEngine(Engine):
    """An engine whose runner is always its general runner (several inputs, pytree targets, losses
    that run per task). ``MAML`` itself keeps one :class:`fastmaml.engine.Engine` and passes
    ``runner=engine.general`` to the calls that need it; this class stays for old imports."""

    def __init__(self, model, layout, inner_lr, kernel_backend=None, batching: str = "auto") -> None:
        super().__init__(model, layout, inner_lr, kernel_backend, batching if batching in ("vmap", "loop") else "auto")
        self.runner = self.general
        self.fallback_reason = "several inputs, targets other than one tensor, or a loss that vmap cannot run"


# -- the autograd.Function ----------------------------------------------------------------------
class _Pending:
    """What the forward leaves for the backward (held outside ctx so the backward can release it)."""

    __slots__ = ("engine", "runner", "loop", "adapted", "shared_names", "learn_lr", "observe")

    def __init__(self, engine, adapted, shared_names, learn_lr, observe=None, runner=None):
        self.engine, self.runner, self.loop = engine, runner, None
        self.adapted, self.shared_names, self.learn_lr = adapted, shared_names, learn_lr
        self.observe = observe  # the inner loop's observe(k, theta_k) (BatchNorm running statistics)


class AdaptFunction(torch.autograd.Function):
    """theta_K [T, P] = inner_loop(theta, lr, phi); backward: ``Engine.reverse`` (one use).

    Inputs: (pending, args, lr, *adapted params in layout order, *shared params)."""

    @staticmethod
    def forward(ctx, pending: _Pending, args: Tuple, lr: Tensor, *params: Tensor) -> Tensor:
        sx, sy, steps, first_order, loss_fn, memory = args
        with torch.enable_grad():
            loop = pending.engine.inner_loop(sx, sy, steps, first_order, loss_fn, memory, observe=pending.observe,
                                             runner=pending.runner)
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
                     observe=None, runner=None) -> Tuple[Tensor, Tensor]:
    """(fast flat [T, P] connected to the meta-parameters, support losses [K, T]). ``observe(k,
    theta_k)`` sees the inner loop's iterates (``Engine.inner_loop``; not the backward's
    recomputations): ``MAML(bn_stats="running")`` records BatchNorm statistics with it. ``runner``:
    the engine's runner for the call (default ``engine.runner_for(loss_fn)``)."""
    params = dict(learner.model.named_parameters())
    adapted = [params[n] for n in learner.layout.names]
    shared = engine.shared_params()
    T = num_tasks(sx)
    if steps == 0:
        flat = learner.layout.flatten(adapted).unsqueeze(0).expand(T, -1)
        return flat, torch.empty(0, T, dtype=flat.dtype, device=flat.device)
    lr = learner.inner_lr.lr
    pending = _Pending(engine, adapted, list(shared.keys()), learner.inner_lr.learnable, observe, runner)
    args = (sx, sy, steps, learner.first_order, loss_fn, memory)
    flat = AdaptFunction.apply(pending, args, lr, *adapted, *shared.values())
    losses = pending.loop.support_losses if pending.loop is not None else None
    return flat, losses
