"""``MAML(backend="reference")``'s per-task inner loop (the oracle's, :mod:`fastmaml.reference.maml`),
for ``adapt`` and for the running statistics of a reference meta-step."""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..functional import batch_statistics, is_classification
from ..reference import maml as reference


def reference_adapt(learner, sx, sy, steps, loss_fn, observe=None):
    """The oracle's per-task inner loop: (theta_K [T, P], support losses [K, T]);
    ``observe(k, theta_k [T, P])`` for k = 0..K afterwards, as the engine's."""
    loss_fn = loss_fn or (torch.nn.functional.cross_entropy if is_classification(sy) else torch.nn.functional.mse_loss)
    lr = learner.inner_lr.lr.detach()
    iterates: List[List[Tensor]] = [[] for _ in range(steps + 1)]  # [k][t]
    losses = torch.empty(steps, sx.shape[0], dtype=lr.dtype, device=lr.device)
    with torch.enable_grad(), batch_statistics(learner.model):
        for t in range(sx.shape[0]):
            fast = {n: p for n, p in learner.model.named_parameters() if p.requires_grad}
            iterates[0].append(learner.layout.flatten(fast[n].detach() for n in learner.layout.names))
            for k in range(steps):
                fast, loss = reference.sgd_step(learner.model, learner.inner_lr, learner.layout, fast, k,
                                                sx[t], sy[t], False, loss_fn, lr.to(sx.dtype))
                losses[k, t] = loss.detach()
                iterates[k + 1].append(learner.layout.flatten(fast[n].detach() for n in learner.layout.names))
    if observe is not None:
        for k, its in enumerate(iterates):
            observe(k, torch.stack(its))
    return torch.stack(iterates[steps]), losses
