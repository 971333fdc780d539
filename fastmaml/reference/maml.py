"""The oracle: MAML's Algorithm 2 (Finn et al., 2017), literally, one task at a time.

For each task t: K steps of SGD on the support loss from the meta-parameters, with
``torch.autograd.grad(create_graph=not first_order)``, then the query loss of the adapted weights;
the objective ``J = (1/T) sum_t sum_k w_k L_Q^t(theta_k)`` is differentiated by autograd through the
whole unrolled graph. Slow and memory-hungry by design: it is what every fast path is tested against.

Independence (issue 15): an oracle that shares a helper with the engine cannot see a bug in it. So
this module writes out for itself the semantics it is there to verify:

* BatchNorm with per-task batch statistics: its own context (``_per_task_batch_statistics``), not
  ``fastmaml.functional.batch_statistics``;
* learning-rate indexing: its own table (``rate_for``), not ``InnerLR.rate`` / ``InnerLR.for_tensor``;
  it reads only ``inner_lr.mode`` and the raw ``inner_lr.lr`` tensor;
* the default losses (cross-entropy for int64 labels, MSE for float targets);
* the inner step of every forward (MAML++'s per-step BatchNorm weights read it): the support pass
  of inner step k at step k, the query pass after k + 1 updates at step k (the MAML++ code passes
  ``num_step`` to both). ``fastmaml.step_context.inner_step`` only carries the number to the layer;
  which number is written out here.

What it still takes from its caller, each with its own independent tests
(tests/test_oracle_independence.py): the adapted-parameter names (``layout.names``, chosen by
``fastmaml.layout.select_adapted``) and the multi-step weights ``w_1..w_K`` (``MAML._weights``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..step_context import inner_step

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ReferenceResult:
    objective: Tensor          # J, a 0-d tensor (detached)
    query_losses: Tensor       # [T], L_Q^t(theta_K)
    query_accuracy: Optional[Tensor]  # [T] for classification
    support_losses: Tensor     # [K, T], L_S^t(theta_k) before step k
    query_losses_all: Tensor   # [K + 1, T], L_Q^t(theta_k); NaN where not computed
    param_grads: Dict[str, Tensor]  # every trainable parameter of the model
    lr_grad: Optional[Tensor]  # shaped like inner_lr.lr when it is learnable


def _is_classification(y: Tensor) -> bool:
    return y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _default_loss(y: Tensor) -> LossFn:
    return F.cross_entropy if _is_classification(y) else F.mse_loss


@contextlib.contextmanager
def _per_task_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm normalizes with the statistics of the batch it is given (one task's), reads
    no running statistics and updates none: ``training=True`` with ``track_running_stats=False``
    makes ``F.batch_norm`` get ``running_mean=running_var=None``."""
    saved = []
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            saved.append((m, m.training, m.track_running_stats))
            m.train(True)
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


def _offsets(model: nn.Module, names: Sequence[str]) -> List[int]:
    """Where adapted tensor i starts in the flat per-element rate vector: tensors end to end, in the
    order given, counted from the model's own parameters."""
    params = dict(model.named_parameters())
    out = [0]
    for n in names:
        out.append(out[-1] + params[n].numel())
    return out


def rate_for(mode: str, lr: Tensor, k: int, i: int, names: Sequence[str], model: nn.Module) -> Tensor:
    """Step k's learning rate for adapted tensor i (``names[i]``), broadcastable to its shape.

    ==================== ============ ====================================
    mode                 lr shape     rate of step k, tensor i, element p
    ==================== ============ ====================================
    scalar               []           lr
    per_step             [K]          lr[k]
    per_layer_per_step   [K, S]       lr[k, i]
    per_parameter        [P]          lr[offset_i + p] (every step)
    ==================== ============ ====================================
    """
    if mode == "scalar":
        assert lr.dim() == 0
        return lr
    if mode == "per_step":
        return lr[k]
    if mode == "per_layer_per_step":
        return lr[k][i]
    if mode == "per_parameter":
        off = _offsets(model, names)
        shape = dict(model.named_parameters())[names[i]].shape
        return lr[off[i]:off[i + 1]].reshape(shape)
    raise ValueError(f"reference: unknown lr mode {mode!r}")


def _loss(model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn) -> Tuple[Tensor, Tensor]:
    pred = functional_call(model, params, (x,))
    return loss_fn(pred, y), pred


def sgd_step(
    model: nn.Module, inner_lr, layout, fast: Dict[str, Tensor], k: int,
    x: Tensor, y: Tensor, create_graph: bool, loss_fn: LossFn, lr: Tensor,
) -> Tuple[Dict[str, Tensor], Tensor]:
    """Inner step k on one task's support set: (theta_{k+1}, L_S(theta_k)).

    ``inner_lr`` supplies only its ``mode``; ``lr`` is the raw rate tensor; ``layout`` only its
    ``names`` (the adapted tensors, in order)."""
    names = list(layout.names)
    with _per_task_batch_statistics(model), inner_step(k):  # the support pass of step k: step k
        loss, _ = _loss(model, fast, x, y, loss_fn)
    grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
    fast = dict(fast)
    for i, (n, g) in enumerate(zip(names, grads)):
        fast[n] = fast[n] - rate_for(inner_lr.mode, lr, k, i, names, model) * g
    return fast, loss


def meta_gradient(
    model: nn.Module,
    inner_lr,
    layout,
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
    loss_fn = loss_fn or _default_loss(query_y)
    T = support_x.shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lr = inner_lr.lr.to(next(iter(params.values())).dtype)
    support_losses = torch.full((steps, T), float("nan"), dtype=lr.dtype)
    query_all = torch.full((steps + 1, T), float("nan"), dtype=lr.dtype)
    objective = 0.0
    final_preds = []
    with _per_task_batch_statistics(model):
        for t in range(T):
            fast = params
            for k in range(steps):
                fast, ls = sgd_step(model, inner_lr, layout, fast, k, support_x[t], support_y[t],
                                    not first_order, loss_fn, lr)
                support_losses[k, t] = ls.detach()
                if k + 1 < steps and weights[k] != 0.0:
                    with inner_step(k):  # the query pass after k + 1 updates: step k
                        lq, _ = _loss(model, fast, query_x[t], query_y[t], loss_fn)
                    query_all[k + 1, t] = lq.detach()
                    objective = objective + weights[k] * lq / T
            with inner_step(steps - 1):  # the query pass after all K updates: step K - 1
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
    if _is_classification(query_y):
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
