"""The shared frame of every algorithm's ``meta_step`` (MAML, ANIL, Reptile, iMAML).

Every meta-step begins and ends alike; only the gradient in between is the algorithm's:

1. :func:`begin_meta_step`: the model still has the parameters the learner was built with, ``steps``
   is valid (and the multi-step weights agree with it), no module draws random numbers, the reference
   backend is not asked for running statistics, and the inputs are valid task batches
   (``LearnerChecks``);
2. the algorithm computes ``grads`` {parameter name: meta-gradient} and, with learned inner rates,
   ``lr_grad``; a non-finite loss is refused (:func:`check_losses_finite`);
3. :func:`finish_meta_step`: a non-finite meta-gradient is refused, then every gradient is added to
   ``.grad`` as ``backward()`` adds (:func:`accumulate_meta_gradient`). A refused step leaves the
   parameters and ``.grad`` unchanged, since nothing is written before every check passed.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor


def begin_meta_step(learner, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                    loss_fn, steps: Optional[int], resolve=None) -> Tuple[int, Sequence[float], object]:
    """The checks every meta-step starts with; returns (steps, the multi-step weights w_1..w_K,
    loss_fn). ``resolve(loss_fn, support_y)``: MAML maps ``nn.CrossEntropyLoss()`` and
    ``nn.MSELoss()`` to the built-in losses before the inputs are checked."""
    learner._check_model("meta_step")
    steps = learner._steps(steps)
    weights = learner._weights(steps)
    learner._check_deterministic("meta_step")
    learner._check_reference_eval("meta_step")
    if resolve is not None:
        loss_fn = resolve(loss_fn, support_y)
    learner._check_inputs((("support_x", support_x, "support_y", support_y),
                           ("query_x", query_x, "query_y", query_y)), loss_fn)
    return steps, weights, loss_fn


def check_losses_finite(support_losses: Tensor, query_losses: Tensor, algorithm: str) -> None:
    """Refuse a meta-step whose support or query losses are not all finite."""
    if not bool(torch.isfinite(support_losses).all()) or not bool(torch.isfinite(query_losses).all()):
        raise FloatingPointError(f"non-finite support or query loss in {algorithm}'s meta-step; the model's "
                                 "parameters and .grad are unchanged")


def accumulate_grad(p: Tensor, g: Tensor) -> None:
    """p.grad += g (in p's dtype and shape), as ``backward()`` accumulates."""
    g = g.detach().to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


def accumulate_meta_gradient(learner, grads: Dict[str, Tensor], lr_grad: Optional[Tensor] = None) -> None:
    """Add ``grads`` to the ``.grad`` of the model's parameters (in ``named_parameters`` order) and
    ``lr_grad`` to the learned inner rates' ``.grad``."""
    for name, p in learner.model.named_parameters():
        if name in grads:
            accumulate_grad(p, grads[name])
    if lr_grad is not None:
        accumulate_grad(learner.inner_lr.lr, lr_grad)


def finish_meta_step(learner, grads: Dict[str, Tensor], lr_grad: Optional[Tensor] = None) -> None:
    """Refuse a non-finite meta-gradient, then accumulate it into ``.grad``."""
    learner._check_meta_gradient(grads, lr_grad)
    accumulate_meta_gradient(learner, grads, lr_grad)
