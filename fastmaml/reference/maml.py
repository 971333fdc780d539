"""The oracle: MAML's Algorithm 2 (Finn et al., 2017), literally, one task at a time.

For each task t: K steps of SGD on the support loss from the meta-parameters, with
``torch.autograd.grad(create_graph=not first_order)``, then the query loss of the adapted weights;
the objective ``J = (1/T) sum_t sum_k w_k L_Q^t(theta_k)`` is differentiated by autograd through the
whole unrolled graph. Slow and memory-hungry by design: it is what every fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..functional import LossFn, batch_statistics, default_loss, is_classification
from ..inner_lr import InnerLR
from ..layout import FlatLayout


@dataclass
class ReferenceResult:
    objective: Tensor          # J, a 0-d tensor (detached)
    query_losses: Tensor       # [T], L_Q^t(theta_K)
    query_accuracy: Optional[Tensor]  # [T] for classification
    support_losses: Tensor     # [K, T], L_S^t(theta_k) before step k
    query_losses_all: Tensor   # [K + 1, T], L_Q^t(theta_k); NaN where not computed
    param_grads: Dict[str, Tensor]  # every trainable parameter of the model
    lr_grad: Optional[Tensor]  # shaped like inner_lr.lr when it is learnable


def _loss(model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn) -> Tuple[Tensor, Tensor]:
    pred = functional_call(model, params, (x,))
    return loss_fn(pred, y), pred


def sgd_step(
    model: nn.Module, inner_lr: InnerLR, layout: FlatLayout, fast: Dict[str, Tensor], k: int,
    x: Tensor, y: Tensor, create_graph: bool, loss_fn: LossFn, lr: Tensor,
) -> Tuple[Dict[str, Tensor], Tensor]:
    """Inner step k on one task's support set: (theta_{k+1}, L_S(theta_k))."""
    loss, _ = _loss(model, fast, x, y, loss_fn)
    grads = torch.autograd.grad(loss, [fast[n] for n in layout.names], create_graph=create_graph)
    fast = dict(fast)
    for i, (n, g) in enumerate(zip(layout.names, grads)):
        fast[n] = fast[n] - inner_lr.for_tensor(k, i, layout, lr) * g
    return fast, loss


def meta_gradient(
    model: nn.Module,
    inner_lr: InnerLR,
    layout: FlatLayout,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    steps: int,
    first_order: bool,
    weights: Sequence[float],
    loss_fn: Optional[LossFn] = None,
) -> ReferenceResult:
    """The meta-gradient of J for a task batch, by unrolled autograd; ``weights[k-1]`` is w_k."""
    loss_fn = loss_fn or default_loss(query_y)
    T = support_x.shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lr = inner_lr.lr.to(next(iter(params.values())).dtype)
    support_losses = torch.full((steps, T), float("nan"), dtype=lr.dtype)
    query_all = torch.full((steps + 1, T), float("nan"), dtype=lr.dtype)
    objective = 0.0
    final_preds = []
    with batch_statistics(model):
        for t in range(T):
            fast = params
            for k in range(steps):
                fast, ls = sgd_step(model, inner_lr, layout, fast, k, support_x[t], support_y[t],
                                    not first_order, loss_fn, lr)
                support_losses[k, t] = ls.detach()
                if k + 1 < steps and weights[k] != 0.0:
                    lq, _ = _loss(model, fast, query_x[t], query_y[t], loss_fn)
                    query_all[k + 1, t] = lq.detach()
                    objective = objective + weights[k] * lq / T
            lq, pred = _loss(model, fast, query_x[t], query_y[t], loss_fn)
            query_all[steps, t] = lq.detach()
            objective = objective + weights[steps - 1] * lq / T
            final_preds.append(pred.detach())
    wrt: List[Tensor] = list(params.values())
    if inner_lr.learnable:
        wrt.append(inner_lr.lr)
    grads = torch.autograd.grad(objective, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
    accuracy = None
    if is_classification(query_y):
        accuracy = torch.stack([(p.argmax(-1) == y).to(lr.dtype).mean() for p, y in zip(final_preds, query_y)])
    return ReferenceResult(
        objective=objective.detach(),
        query_losses=query_all[steps].clone(),
        query_accuracy=accuracy,
        support_losses=support_losses,
        query_losses_all=query_all,
        param_grads=dict(zip(params.keys(), grads[: len(params)])),
        lr_grad=grads[-1] if inner_lr.learnable else None,
    )
