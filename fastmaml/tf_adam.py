"""Adam with TensorFlow's epsilon: the meta-optimizer of the MAML code (``adam_epsilon=tf``).

``tf.train.AdamOptimizer`` adds its epsilon to sqrt(v_t) before the bias correction is applied to the
step:

    theta -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps)

PyTorch's ``Adam`` adds it after, to sqrt(v_t / (1 - beta2^t)):

    theta -= lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

Multiplying PyTorch's numerator and denominator by sqrt(1 - beta2^t) shows that TensorFlow's update
is PyTorch's with ``eps / sqrt(1 - beta2^t)``: 31.6x larger at t = 1, 1.26x at t = 1,000, the same
after a few thousand steps. :class:`TFEpsilonAdam` sets that epsilon before each step, from the step
count in the optimizer's state (so it resumes from a state_dict exactly). The two differ only where
sqrt(v_t) is within a few orders of magnitude of eps, i.e. for parameters with gradients near 1e-8.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TFEpsilonAdam"]


class TFEpsilonAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose ``eps`` is TensorFlow's (module docstring). Same arguments; ``amsgrad``
    is refused (TensorFlow's Adam has none)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in self.param_groups:
            group["tf_eps"] = eps

    def _next_step(self, group) -> int:
        done = [int(self.state[p]["step"]) for p in group["params"] if p in self.state and "step" in self.state[p]]
        return (max(done) if done else 0) + 1

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            t = self._next_step(group)
            group["eps"] = group["tf_eps"] / math.sqrt(1.0 - group["betas"][1] ** t)
        return super().step(closure)
