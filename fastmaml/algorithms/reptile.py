"""Reptile (Nichol, Achiam & Schulman 2018, "On first-order meta-learning algorithms").

For each task, k steps of SGD from the meta-parameters theta give phi_t; the meta-update moves theta
toward them:

    batched (the paper's Algorithm 2):  theta <- theta + eps * (1/T) sum_t (phi_t - theta)
    serial  (Algorithm 1, T tasks in turn): for t = 1..T:  theta <- theta + eps * (phi_t(theta) - theta)

All T tasks' inner SGD runs as one [T, P] computation (the engine's support gradients on the fused
path when the model is supported, and the fused ``inner_update`` op). ``meta_step`` writes the
update as a gradient, so that plain SGD with learning rate eps performs it:

    batched: .grad += theta - mean_t phi_t
    serial:  .grad += (theta - theta_serial) / eps        (needs ``outer_lr`` = eps)

(with Adam as the outer optimizer, as learn2learn's examples do, the same direction is rescaled per
element). Every trainable parameter adapts, BatchNorm's affine ones too (``adapt_bn=True``), since
Reptile has no meta-gradient for parameters the inner loop does not move.

Differences from the paper's code: the inner optimizer is SGD (its Omniglot runs use Adam with
beta1 = 0 inside the loop), and the inner loop trains on the support set (``inner_data='support'``,
the query set is then held out and its loss after adaptation is what ``meta_step`` reports) or on
support and query together (``inner_data='all'``, closer to the paper's "train shots").
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import kernels as kernel_ops
from ..functional import is_classification, task_accuracy, task_losses
from ..learner.meta_step_template import begin_meta_step, finish_meta_step
from ..learner.validation import check_number
from ..maml import MAML, MetaStepOutput

__all__ = ["Reptile", "VARIANTS"]

VARIANTS = ("batched", "serial")
INNER_DATA = ("support", "all")


class Reptile(MAML):
    """Reptile over a task batch, the inner SGD of all tasks batched as [T, P].

    Args:
        model: any ``nn.Module`` (the fused path runs the supported ones).
        inner_lr: the inner SGD step size (a number, or one per step).
        inner_steps: k, the inner SGD steps per task in ``meta_step``.
        variant: 'batched' (Algorithm 2) or 'serial' (Algorithm 1; needs ``outer_lr``).
        outer_lr: eps, the meta step size, for the serial variant (its tasks depend on each other).
        inner_batch: examples per inner step (a minibatch drawn without replacement, cycling over the
            task's data, the same positions for every task); None: the whole set every step.
        inner_data: 'support' or 'all' (support and query sets together).
        adapt_bn: adapt (and so meta-learn) BatchNorm's scale and shift; default True.
        kernels, batching: as for :class:`fastmaml.MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: Union[float, Sequence[float]] = 0.1, inner_steps: int = 5,
                 variant: str = "batched", outer_lr: Optional[float] = None, inner_batch: Optional[int] = None,
                 inner_data: str = "support", adapt_bn: bool = True, kernels: Optional[str] = None,
                 batching: str = "auto") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if inner_data not in INNER_DATA:
            raise ValueError(f"inner_data must be one of {', '.join(INNER_DATA)}, got {inner_data!r}")
        if variant == "serial":
            if outer_lr is None:
                raise ValueError("variant='serial' needs outer_lr (eps) in (0, 1], got None")
            outer_lr = check_number("outer_lr (eps, the serial variant's meta step size)", outer_lr, 0.0, True, 1.0)
        elif outer_lr is not None:
            outer_lr = check_number("outer_lr (eps, the meta step size)", outer_lr, 0.0, True)
        if inner_batch is not None and (not isinstance(inner_batch, int) or isinstance(inner_batch, bool)
                                        or inner_batch < 1):
            raise ValueError(f"inner_batch must be None or an int >= 1, got {inner_batch!r}")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True, adapt_bn=adapt_bn,
                         kernels=kernels, batching=batching)
        self.variant = variant
        self.outer_lr = None if outer_lr is None else float(outer_lr)
        self.inner_batch = inner_batch
        self.inner_data = inner_data

    def set_outer_lr(self, outer_lr: float) -> None:
        """The serial variant's eps (e.g. from a schedule); keep it equal to the outer SGD's lr."""
        self.outer_lr = check_number("outer_lr (eps)", outer_lr, 0.0, True, 1.0)

    # -- the task-batched inner SGD ------------------------------------------------------------
    def inner_sgd(self, theta0: Tensor, x: Tensor, y: Tensor, steps: int, loss_fn=None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
        """phi [T, P]: ``steps`` SGD steps for every task from ``theta0`` ([P] or [T, P])."""
        eng = self.engine
        ops = kernel_ops.ops_for(theta0, eng.kernel_backend)
        lr = self.inner_lr.lr.detach().to(theta0.dtype)
        N = x.shape[1]
        order = None
        if self.inner_batch is not None and self.inner_batch < N:
            order = torch.randperm(N, generator=generator, device="cpu").to(x.device)
        theta, pos = theta0, 0
        for k in range(steps):
            xb, yb = x, y
            if order is not None:
                if pos + self.inner_batch > N:
                    order = torch.randperm(N, generator=generator, device="cpu").to(x.device)
                    pos = 0
                idx = order[pos:pos + self.inner_batch]
                pos += self.inner_batch
                xb, yb = x.index_select(1, idx), y.index_select(1, idx)
            with torch.enable_grad():
                g, losses, _ = eng.support_grad(theta, xb, yb, loss_fn, create_graph=False)
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError(f"non-finite inner loss at Reptile step {k}; the model's parameters "
                                         "and .grad are unchanged")
            rate, seg = eng.step_rate(k, lr, x.device)
            theta = ops.inner_update(theta, g.detach(), rate, seg)
        if theta.dim() == 1:
            theta = theta.expand(x.shape[0], -1)
        return theta

    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn=None, steps: Optional[int] = None) -> MetaStepOutput:
        """One Reptile meta-update direction, added to ``.grad`` (see the module docstring).
        Reports the query loss (and accuracy) of every task after its inner loop."""
        steps, _, loss_fn = begin_meta_step(self, support_x, support_y, query_x, query_y, loss_fn, steps)
        if self.inner_data == "all":
            x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        else:
            x, y = support_x, support_y
        theta0 = self.engine.theta()
        T = x.shape[0]
        if self.variant == "batched":
            phi = self.inner_sgd(theta0, x, y, steps, loss_fn)
            direction = theta0 - phi.mean(0)
        else:
            eps = self.outer_lr
            theta = theta0
            rows = []
            for t in range(T):
                phi_t = self.inner_sgd(theta, x[t:t + 1], y[t:t + 1], steps, loss_fn)[0]
                rows.append(phi_t)
                theta = theta + eps * (phi_t - theta)
            phi = torch.stack(rows)
            direction = (theta0 - theta) / eps
        with torch.no_grad():
            pred = self.engine.forward(phi, query_x)
            losses = task_losses(pred, query_y, loss_fn)
        finish_meta_step(self, dict(self.layout.views(direction)))
        acc = task_accuracy(pred, query_y) if is_classification(query_y) else None
        return MetaStepOutput(losses.mean(), losses, acc)
