"""Small models and task batches shared by the engine tests."""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

import fastmaml


def mlp(in_features: int = 1, hidden: int = 7, out: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def conv_bn(ways: int = 3, hidden: int = 4, size: int = 8, layers: int = 2) -> nn.Module:
    """The paper's conv block (3x3 conv, BatchNorm, ReLU, 2x2 max-pool), repeated, at a tiny size."""
    mods: List[nn.Module] = []
    c = 1
    for _ in range(layers):
        mods += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
        c = hidden
    side = size // 2 ** layers
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(hidden * side * side, ways))


def regression_batch(T: int, n_support: int = 5, n_query: int = 6, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n_support, 1, generator=g, dtype=dtype)
    qx = torch.randn(T, n_query, 1, generator=g, dtype=dtype)
    amp = torch.rand(T, 1, 1, generator=g, dtype=dtype) + 0.5
    return sx, amp * torch.sin(sx), qx, amp * torch.sin(qx)


def classification_batch(T: int, ways: int = 3, shots: int = 2, queries: int = 2, size: int = 8,
                         dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.randn(T, ways * queries, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def grads_of(learner: fastmaml.MAML) -> List[Tensor]:
    return [p.grad.clone() for p in learner.parameters() if p.requires_grad]


def run(model: nn.Module, batch, backend: str, **kw) -> Tuple[List[Tensor], fastmaml.MetaStepOutput, fastmaml.MAML]:
    """A fresh copy of ``model`` meta-stepped once with the given backend: (grads, output, learner)."""
    learner = fastmaml.MAML(copy.deepcopy(model), backend=backend, **kw)
    out = learner.meta_step(*batch)
    return grads_of(learner), out, learner


def rel_err(a: List[Tensor], b: List[Tensor]) -> float:
    """Whole-gradient relative error ||a - b|| / ||b|| over all tensors together."""
    fa = torch.cat([x.flatten() for x in a])
    fb = torch.cat([x.flatten() for x in b])
    return float((fa - fb).norm() / fb.norm())


def state(learner: nn.Module) -> Dict[str, Tensor]:
    """Parameters, buffers and grads, copied: to show that a failed call changed nothing."""
    out = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    for n, p in learner.named_parameters():
        out["grad:" + n] = None if p.grad is None else p.grad.clone()
    return out


def same_state(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if (a[k] is None) != (b[k] is None):
            return False
        if a[k] is not None and not torch.equal(a[k], b[k]):
            return False
    return True
