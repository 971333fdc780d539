"""Fused-path tests that close the gaps the mutation check found in the layer kernels (issue 21).

Each test names the planted bug of bench/mutation_check.py it is there to catch, and runs the
branch that bug sits in, which the models of tests/test_fused_engine.py never reach. All compare
the fused path (``batching="fused"``: the task-batched layer kernels, the HVP by the R-operator) with
the per-task oracle (``backend="reference"``: a loop over tasks through autograd's unrolled graph,
sharing no computation with the fused path) in float64, by the whole-gradient relative error over
every trainable parameter, on fresh non-uniform inputs (a scale and an offset per task, labels
shuffled per task) and randomly perturbed weights, second order (the HVP is part of the
meta-gradient). One test checks ``FusedModel.hvp`` itself against autograd's per-task HVP, for a
loss seeded with a scale other than 1 (which the engine's own calls never use).
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fastmaml
from fastmaml.layers import layer_kernels
from fastmaml.layers.program import compile_model
from fastmaml.layers.runner import FusedModel
from fastmaml.layout import FlatLayout

TOL = 1e-10  # float64, fused path vs oracle (seen: about 1e-15)
DT = torch.float64


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in float64 with every parameter moved by fresh noise (no two units alike)."""
    model = model.to(DT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def image_batch(T: int, ways: int, shots: int, queries: int, H: int, W: int,
                seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(support x [T, ways*shots, 1, H, W], labels [T, ways*shots], query x, labels): each task's
    images with their own scale and offset, the labels in a different order per task."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        scale = 0.5 + torch.rand(T, 1, 1, 1, 1, generator=g, dtype=DT)
        offset = 0.3 * torch.randn(T, 1, 1, 1, 1, generator=g, dtype=DT)
        return torch.randn(T, n, 1, H, W, generator=g, dtype=DT) * scale + offset

    def labels(per_class: int) -> Tensor:
        base = torch.arange(ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(base.numel(), generator=g)] for _ in range(T)])

    return images(ways * shots), labels(shots), images(ways * queries), labels(queries)


def meta_gradient(model: nn.Module, batch, **kw) -> Tuple[List[Tensor], fastmaml.MAML]:
    learner = fastmaml.MAML(copy.deepcopy(model), **kw)
    learner.meta_step(*batch)
    return [p.grad for p in learner.parameters() if p.requires_grad], learner


def rel(a: List[Tensor], b: List[Tensor]) -> float:
    fa = torch.cat([t.flatten() for t in a])
    fb = torch.cat([t.flatten() for t in b])
    return float((fa - fb).norm() / fb.norm())


def assert_fused_matches_oracle(model: nn.Module, batch, **kw) -> None:
    want, _ = meta_gradient(model, batch, backend="reference", **kw)
    got, learner = meta_gradient(model, batch, batching="fused", **kw)
    assert learner.execution_path.startswith("fused"), learner.execution_path
    err = rel(got, want)
    assert err <= TOL, f"whole-gradient relative error {err:.2e}"


def test_first_layer_conv_bias_r_gradient_without_batchnorm():
    """Mutant runner_conv_rbias_needs_rx: the conv R-backward skips the bias's R-gradient where the
    layer's input has no R-part (the first layer). Every conv of the engine tests' models with a
    bias either has an R-part in its input or feeds a BatchNorm, whose batch mean removes a
    per-channel bias (its gradient and HVP rows are zero): here the first conv's bias feeds a ReLU."""
    model = perturbed(nn.Sequential(
        nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 4)), seed=1)
    batch = image_batch(T=3, ways=4, shots=2, queries=3, H=9, W=9, seed=2)
    assert_fused_matches_oracle(model, batch, inner_steps=2, inner_lr=0.3)


def test_standalone_leaky_relu():
    """Mutant runner_act_rforward_ignores_slope: a standalone activation's R-forward uses ReLU's
    derivative. The engine tests' only standalone activation is a ReLU (a LeakyReLU after a
    BatchNorm is fused into the block): here LeakyReLUs with two slopes follow Linear layers."""
    model = perturbed(nn.Sequential(
        nn.Flatten(), nn.Linear(7 * 6, 9), nn.LeakyReLU(0.2), nn.Linear(9, 8), nn.LeakyReLU(0.05),
        nn.Linear(8, 4)), seed=3)
    batch = image_batch(T=3, ways=4, shots=2, queries=3, H=7, W=6, seed=4)
    assert_fused_matches_oracle(model, batch, inner_steps=2, inner_lr=0.4)


def test_standalone_maxpool_on_non_square_maps():
    """Mutant runner_maxpool_backward_hw_swapped: the standalone max-pool's backward takes the map's
    height for its width. The engine tests' images are square: here 7 x 10 (an odd height, whose
    last row the pool drops) and 3 x 5 after the first pool."""
    model = perturbed(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 1 * 2, 4)), seed=5)
    batch = image_batch(T=3, ways=4, shots=2, queries=3, H=7, W=10, seed=6)
    assert_fused_matches_oracle(model, batch, inner_steps=2, inner_lr=0.3)


def _unflatten(model: nn.Module, flat: Tensor) -> dict:
    """name -> tensor of the model's shape, cut from ``flat`` [P] in named_parameters order."""
    out, at = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[at:at + p.numel()].view(p.shape)
        at += p.numel()
    return out


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_fused_hvp_of_a_scaled_loss(kind):
    """Mutant runner_mse_rbackward_unscaled: the MSE R-backward drops the loss's seed ``scale``.
    ``FusedModel.grad(..., scale=s, keep=True)`` promises s dL_t/dtheta_t and an HVP of the same
    scaled loss; the engine seeds its support passes (the only ones it takes an HVP of) with 1, so
    only a direct call shows it. Oracle: per task, autograd's double backward of
    s * loss(functional_call(model, theta_t, x_t), y_t)."""
    T, N, I, O = 3, 6, 5, 4
    model = perturbed(nn.Sequential(nn.Linear(I, 7), nn.LeakyReLU(0.1), nn.Linear(7, O)), seed=7)
    names = [n for n, _ in model.named_parameters()]
    fused = FusedModel(model, FlatLayout.of(model, names), compile_model(model),
                       layer_kernels(torch.device("cpu"), "auto"))
    g = torch.Generator().manual_seed(8)
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    theta = flat0 + 0.2 * torch.randn(T, flat0.numel(), generator=g, dtype=DT)
    x = torch.randn(T, N, I, generator=g, dtype=DT) * (0.5 + torch.rand(T, 1, I, generator=g, dtype=DT))
    if kind == "mse":
        y = torch.randn(T, N, O, generator=g, dtype=DT) + torch.randn(T, 1, O, generator=g, dtype=DT)
    else:
        y = torch.randint(0, O, (T, N), generator=g)
    u = torch.randn(T, flat0.numel(), generator=g, dtype=DT)
    scale = 0.37

    res = fused.grad(theta, x, y, scale=scale, keep=True)
    hv, _ = fused.hvp(res.state, u, shared=False)

    want_g, want_hv = [], []
    for t in range(T):
        th = theta[t].clone().requires_grad_(True)
        pred = functional_call(model, _unflatten(model, th), (x[t],))
        loss = F.mse_loss(pred, y[t]) if kind == "mse" else F.cross_entropy(pred, y[t])
        (gt,) = torch.autograd.grad(scale * loss, th, create_graph=True)
        (ht,) = torch.autograd.grad(gt, th, grad_outputs=u[t])
        want_g.append(gt.detach())
        want_hv.append(ht)
    assert rel([res.grad], [torch.stack(want_g)]) <= 1e-13
    err = rel([hv], [torch.stack(want_hv)])
    assert err <= 1e-13, f"HVP relative error {err:.2e}"
