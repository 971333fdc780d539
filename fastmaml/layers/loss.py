"""The fused path's built-in losses, per task: L_t = mean over task t's examples; seeded with dL/dL_t = scale.

Cross-entropy (int64 labels y [T, N], logits z [T, N, K]), p = softmax(z):

* forward + backward: L_t = -mean_n log p[t, n, y], dL/dz = scale (p - onehot(y)) / N
* R-backward:         R{dL/dz} = scale (diag p - p p^T) R{z} / N           (the softmax Hessian)

Mean squared error (float targets y shaped like the predictions, M elements per task):

* forward + backward: L_t = mean (pred - y)^2, dL/dpred = 2 scale (pred - y) / M
* R-backward:         R{dL/dpred} = 2 scale R{pred} / M

:func:`builtin_loss` picks the loss from the targets (as the engine's default loss does) and
returns what the HVP's R-backward needs (:func:`loss_rbackward`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .tensors import Opt


def cross_entropy_forward_backward(logits: Tensor, y: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(losses [T], dlogits [T, N, K] = scale (p - onehot) / N, p)."""
    T, N, K = logits.shape
    logp = torch.log_softmax(logits, dim=-1)
    losses = -logp.gather(-1, y[..., None])[..., 0].mean(1)
    p = logp.exp()
    d = p.clone()
    d.scatter_add_(-1, y[..., None], -torch.ones_like(d[..., :1]))
    return losses, d * (scale / N), p


def cross_entropy_rbackward(p: Tensor, rlogits: Opt, scale: float) -> Opt:
    """R{dlogits} = scale (diag p - p p^T) R{logits} / N."""
    if rlogits is None:
        return None
    N = p.shape[1]
    pr = p * rlogits
    return (pr - p * pr.sum(-1, keepdim=True)) * (scale / N)


def mse_forward_backward(pred: Tensor, y: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(losses [T] = mean over each task's elements of (pred - y)^2, dpred = 2 scale (pred - y) / M)."""
    diff = pred - y
    M = diff[0].numel()
    return diff.pow(2).flatten(1).mean(1), diff * (2.0 * scale / M)


def mse_rbackward(pred: Tensor, rpred: Opt, scale: float) -> Opt:
    if rpred is None:
        return None
    return rpred * (2.0 * scale / pred[0].numel())


def builtin_loss(pred: Tensor, y: Tensor, scale: float) -> Tuple[str, Tensor, Tensor, Tensor]:
    """(kind 'mse' or 'ce', losses [T], dL/dpred, what the loss's R-rule needs: the predictions (MSE)
    or the softmax probabilities (CE)). Float targets mean MSE, integer labels cross-entropy."""
    if y.is_floating_point():
        if y.shape != pred.shape:
            raise ValueError(f"regression targets must have the predictions' shape {list(pred.shape)}, "
                             f"got {list(y.shape)}")
        losses, d = mse_forward_backward(pred, y, scale)
        return "mse", losses, d, pred
    if pred.dim() != 3 or y.shape != pred.shape[:2]:
        raise ValueError(f"class labels must be [T, N] = {list(pred.shape[:2])} for predictions "
                         f"{list(pred.shape)}, got {list(y.shape)}")
    losses, d, p = cross_entropy_forward_backward(pred, y, scale)
    return "ce", losses, d, p


def loss_rbackward(kind: str, saved: Tensor, r: Opt, scale: float) -> Opt:
    """R{dL/dpred} of :func:`builtin_loss`'s loss ``kind`` from its saved tensor and R{pred}."""
    return (cross_entropy_rbackward(saved, r, scale) if kind == "ce"
            else mse_rbackward(saved, r, scale))
