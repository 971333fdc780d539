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


# -- issue 15: non-uniform rates, hand-written adaptation (independent of the engine and the oracle) --

LR_MODES = ("scalar", "per_step", "per_layer_per_step", "per_parameter")


def set_random_rates(learner: fastmaml.MAML, seed: int, lo: float = 0.02, hi: float = 0.3) -> Tensor:
    """Overwrite the learner's inner rates with fresh random values in [lo, hi), all different, so
    that a rate read at the wrong step, layer or element changes the result."""
    g = torch.Generator().manual_seed(seed)
    lr = learner.inner_lr.lr
    with torch.no_grad():
        lr.copy_((lo + (hi - lo) * torch.rand(lr.shape, generator=g, dtype=torch.float64)).to(lr.dtype))
    if lr.dim() > 0:
        assert lr.unique().numel() == lr.numel(), "rates must be non-uniform"
    return lr.detach().clone()


def run_random_rates(model: nn.Module, batch, backend: str, seed: int, **kw):
    """``run`` with the rates randomized (the same ``seed`` gives the same rates for every backend)."""
    learner = fastmaml.MAML(copy.deepcopy(model), backend=backend, **kw)
    set_random_rates(learner, seed)
    out = learner.meta_step(*batch)
    return grads_of(learner), out, learner


def rate_table(mode: str, lr: Tensor, steps: int, sizes: List[int]) -> Tensor:
    """[steps, P]: the rate of every element at every step, written out element by element from the
    definition in fastmaml/inner_lr.py's docstring (scalar: lr; per_step: lr[k]; per_layer_per_step:
    lr[k, i] for the elements of adapted tensor i; per_parameter: lr[p])."""
    P = sum(sizes)
    out = torch.empty(steps, P, dtype=lr.dtype)
    for k in range(steps):
        p = 0
        for i, n in enumerate(sizes):
            for _ in range(n):
                if mode == "scalar":
                    out[k, p] = lr
                elif mode == "per_step":
                    out[k, p] = lr[k]
                elif mode == "per_layer_per_step":
                    out[k, p] = lr[k, i]
                else:
                    out[k, p] = lr[p]
                p += 1
    return out


def hand_adapt(model: nn.Module, names: List[str], x: Tensor, y: Tensor, steps: int, rates: Tensor,
               loss_fn=None) -> List[Dict[str, Tensor]]:
    """One task's iterates theta_0..theta_steps by plain SGD: ``rates`` is ``rate_table``'s [K, P] in
    the order of ``names``. The model must have no BatchNorm (or be put in the wanted mode by the
    caller). Detached dicts name -> tensor (all trainable parameters)."""
    loss_fn = loss_fn or (torch.nn.functional.mse_loss if y.is_floating_point() else torch.nn.functional.cross_entropy)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = [dict(params)]
    for k in range(steps):
        leaves = {n: t.clone().requires_grad_(n in names) for n, t in params.items()}
        loss = loss_fn(torch.func.functional_call(model, leaves, (x,)), y)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        p = 0
        params = dict(params)
        for n, gr in zip(names, grads):
            a = rates[k, p:p + gr.numel()].view_as(gr)
            params[n] = params[n] - a * gr
            p += gr.numel()
        out.append(dict(params))
    return out
