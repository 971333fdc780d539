"""The task-batched meta-gradient engine (engine.md sections 2 and 3).

All T tasks advance together: fast weights are one [T, P] buffer, the model runs on all tasks in one
batched computation, and the inner updates and reverse steps are fused ops over [T, P]. The
meta-gradient comes from an explicit reverse pass instead of the unrolled autograd graph:

    v = (w_K / T) grad L_Q(theta_K)
    for k = K-1 .. 0:
        dJ/da_k  = -sum(v * g_k)                       (per scalar / segment / element of a_k)
        v        = v - H_S(theta_k) (a_k v)            (second order only)
        v        = v + (w_k / T) grad L_Q(theta_k)     (multi-step loss, k >= 1)
    dJ/dtheta = sum_t v

Parameters that the inner loop does not adapt (phi) collect ``(w_k/T) dL_Q/dphi`` at every weighted
step and, second order, ``-d/dphi <g_k, a_k v>`` from the same double backward as the HVP.

Memory: ``store`` keeps the iterates theta_0..theta_{K-1} ([T, P] each) and at most one step's
activations; ``recompute`` keeps about sqrt(K) checkpoints and recomputes the iterates between two
checkpoints during the reverse pass. Activation memory does not grow with K in either mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from . import kernels
from .functional import LossFn, TaskBatchedModel, is_classification, task_accuracy, task_losses
from .inner_lr import InnerLR
from .layout import FlatLayout

MEMORY_MODES = ("store", "recompute")


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


class Engine:
    """Holds what one model needs across meta-steps: its layout, the batched model, the segments."""

    def __init__(self, model: nn.Module, layout: FlatLayout, inner_lr: InnerLR,
                 kernel_backend: Optional[str] = None, batching: str = "auto"):
        self.model = model
        self.layout = layout
        self.inner_lr = inner_lr
        self.batched = TaskBatchedModel(model, layout, batching)
        self.kernel_backend = kernel_backend
        self._segments: Dict[torch.device, Tensor] = {}

    # -- pieces ---------------------------------------------------------------------------------
    def segments(self, device: torch.device) -> Tensor:
        if device not in self._segments:
            self._segments[device] = self.layout.segments(device)
        return self._segments[device]

    def shared_params(self) -> Dict[str, nn.Parameter]:
        adapted = set(self.layout.names)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in adapted}

    def theta(self) -> Tensor:
        params = dict(self.model.named_parameters())
        return self.layout.flatten(params[n].detach() for n in self.layout.names)

    def _rate(self, k: int, lr: Tensor, device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
        rate, segmented = self.inner_lr.rate(k, lr)
        return rate, (self.segments(device) if segmented else None)

    def _losses(self, flat: Tensor, x: Tensor, y: Tensor, loss_fn: Optional[LossFn]) -> Tuple[Tensor, Tensor]:
        pred = self.batched.forward(flat, x)
        return task_losses(pred, y, loss_fn), pred

    def support_grad(self, theta_k: Tensor, x: Tensor, y: Tensor, loss_fn, create_graph: bool):
        """(g_k [T, P], L_S [T], the leaf theta_k the graph hangs from): the per-task support
        gradients at theta_k, for all tasks by one backward of the summed per-task losses."""
        T = x.shape[0]
        leaf = theta_k.detach().expand(T, -1).clone().requires_grad_(True) if theta_k.dim() == 1 \
            else theta_k.detach().requires_grad_(True)
        losses, _ = self._losses(leaf, x, y, loss_fn)
        (g,) = torch.autograd.grad(losses.sum(), leaf, create_graph=create_graph)
        return g, losses, leaf

    def forward_steps(self, theta_start: Tensor, k0: int, k1: int, x, y, loss_fn, lr, ops,
                      keep_last_graph: bool, support_losses: Optional[Tensor]):
        """Run inner steps k0..k1-1 from theta_{k0}; returns the iterates theta_{k0}..theta_{k1}
        and, when asked, the graph of step k1-1's gradient (so its HVP needs no recomputation)."""
        iterates = [theta_start]
        kept = None
        theta = theta_start
        for k in range(k0, k1):
            keep = keep_last_graph and k == k1 - 1
            with record_function("fastmaml.support_grad"):
                g, losses, leaf = self.support_grad(theta, x, y, loss_fn, create_graph=keep)
            if support_losses is not None:
                support_losses[k] = losses.detach()
            if keep:
                kept = (g, leaf)
            rate, seg = self._rate(k, lr, theta.device)
            theta = ops.inner_update(theta, g.detach(), rate, seg)
            iterates.append(theta)
        return iterates, kept

    # -- the meta-gradient -----------------------------------------------------------------------
    def meta_gradient(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        steps: int,
        first_order: bool,
        weights: Sequence[float],
        loss_fn: Optional[LossFn] = None,
        memory: str = "store",
    ) -> EngineResult:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        K, T = steps, support_x.shape[0]
        theta0 = self.theta()
        dtype, device = theta0.dtype, theta0.device
        ops = kernels.ops_for(theta0, self.kernel_backend)
        lr = self.inner_lr.lr.detach().to(dtype)
        shared = self.shared_params()
        shared_list = list(shared.values())
        shared_grads = [torch.zeros_like(p) for p in shared_list]
        learn_lr = self.inner_lr.learnable
        lr_grad = torch.zeros_like(lr) if learn_lr else None
        support_losses = torch.full((K, T), float("nan"), dtype=dtype, device=device)
        query_all = torch.full((K + 1, T), float("nan"), dtype=dtype, device=device)

        # Forward: the iterates (all of them, or checkpoints every c steps).
        c = K if memory == "store" else max(1, math.ceil(math.sqrt(K)))
        checkpoints: List[Tensor] = [theta0]
        kept = None
        theta = theta0
        for k0 in range(0, K, c):
            k1 = min(K, k0 + c)
            its, kept = self.forward_steps(theta, k0, k1, support_x, support_y, loss_fn, lr, ops,
                                           keep_last_graph=(not first_order and k1 == K),
                                           support_losses=support_losses)
            if memory == "store":
                checkpoints = its[:-1]
            elif k1 < K:
                checkpoints.append(its[-1])
            theta = its[-1]
        theta_K = theta

        @record_function("fastmaml.query_grad")
        def query_grad(theta_k: Tensor, k: int) -> Tuple[Tensor, Tensor]:
            """(w_k / T) grad L_Q at theta_k for the adapted and the shared parameters."""
            leaf = theta_k.detach().requires_grad_(True)
            losses, pred = self._losses(leaf, query_x, query_y, loss_fn)
            query_all[k] = losses.detach()
            grads = torch.autograd.grad(losses.sum() * (weights[k - 1] / T), [leaf] + shared_list, allow_unused=True)
            for acc, gp in zip(shared_grads, grads[1:]):
                if gp is not None:
                    acc.add_(gp)
            return grads[0], pred

        v, pred_K = query_grad(theta_K, K)
        objective_terms = [weights[K - 1] * query_all[K]]

        # Reverse, one stretch between two checkpoints at a time.
        for k0 in reversed(range(0, K, c)):
            k1 = min(K, k0 + c)
            if memory == "store":
                its = checkpoints
            else:
                its, _ = self.forward_steps(checkpoints[k0 // c], k0, k1, support_x, support_y, loss_fn,
                                            lr, ops, keep_last_graph=False, support_losses=None)
            for k in reversed(range(k0, k1)):
                theta_k = its[k - k0]
                rate, seg = self._rate(k, lr, device)
                hv = g = None
                if not first_order:
                    if kept is not None and k == K - 1:
                        g, leaf = kept
                        kept = None
                    else:
                        with record_function("fastmaml.support_grad"):
                            g, _, leaf = self.support_grad(theta_k, support_x, support_y, loss_fn, create_graph=True)
                    u = ops.scale(v, rate, seg)
                    with record_function("fastmaml.hvp"):
                        grads = torch.autograd.grad(g, [leaf] + shared_list, grad_outputs=u, allow_unused=True)
                    hv = grads[0]
                    for acc, gp in zip(shared_grads, grads[1:]):
                        if gp is not None:
                            acc.sub_(gp)
                    g = g.detach()
                elif learn_lr:
                    g, _, _ = self.support_grad(theta_k, support_x, support_y, loss_fn, create_graph=False)
                gq = None
                if k >= 1 and weights[k - 1] != 0.0:
                    gq, _ = query_grad(theta_k, k)
                    objective_terms.append(weights[k - 1] * query_all[k])
                if g is not None:
                    v, d_rate = ops.reverse_step(v, hv, g, gq, 1.0, rate, seg)
                    if learn_lr:
                        self.inner_lr.accumulate(lr_grad, k, d_rate)
                elif gq is not None:
                    v = v + gq

        theta_grad = v.sum(0) if v.dim() == 2 else v
        objective = torch.stack(objective_terms).sum(0).mean()
        accuracy = task_accuracy(pred_K.detach(), query_y) if is_classification(query_y) else None
        return EngineResult(
            objective=objective,
            query_losses=query_all[K].clone(),
            query_accuracy=accuracy,
            support_losses=support_losses,
            query_losses_all=query_all,
            theta_grad=theta_grad,
            shared_grads=dict(zip(shared.keys(), shared_grads)),
            lr_grad=lr_grad,
        )

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int, loss_fn=None) -> Tuple[Tensor, Tensor]:
        """theta_K [T, P] (detached) and the support losses [K, T]."""
        theta0 = self.theta()
        ops = kernels.ops_for(theta0, self.kernel_backend)
        lr = self.inner_lr.lr.detach().to(theta0.dtype)
        losses = torch.full((steps, support_x.shape[0]), float("nan"), dtype=theta0.dtype, device=theta0.device)
        with torch.enable_grad():
            its, _ = self.forward_steps(theta0, 0, steps, support_x, support_y, loss_fn, lr, ops,
                                        keep_last_graph=False, support_losses=losses)
        theta = its[-1]
        if theta.dim() == 1:
            theta = theta.expand(support_x.shape[0], -1)
        return theta.detach(), losses
