"""Reptile (Nichol et al. 2018): the batched [T, P] inner SGD and both meta-updates against a
hand-written float64 per-task reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.algorithms import Reptile
from fastmaml.models import mlp, mlp_bn


def _sgd(model, x, y, lr, steps, loss):
    """phi for one task: ``steps`` plain SGD steps on every trainable parameter, per-task BN."""
    names = [n for n, p in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        w = [a.requires_grad_(True) for a in w]
        out = torch.func.functional_call(model, dict(zip(names, w)), (x,))
        g = torch.autograd.grad(loss(out, y), w)
        w = [(a - lr * b).detach() for a, b in zip(w, g)]
    return w


def _flat(ws):
    return torch.cat([w.flatten() for w in ws])


def test_batched_reptile_classification_matches_reference():
    torch.manual_seed(0)
    model = mlp_bn(4, (12, 10), in_features=9).double()
    T, N = 3, 8
    sx = torch.randn(T, N, 9, dtype=torch.float64)
    sy = torch.randint(0, 4, (T, N))
    qx, qy = torch.randn(T, 4, 9, dtype=torch.float64), torch.randint(0, 4, (T, 4))
    learner = Reptile(model, inner_lr=0.25, inner_steps=4)
    assert learner.execution_path.startswith("fused")
    theta0 = _flat(p.detach() for p in model.parameters())
    learner.meta_step(sx, sy, qx, qy)
    got = _flat(p.grad for p in model.parameters())
    phis = [_flat(_sgd(model, sx[t], sy[t], 0.25, 4, F.cross_entropy)) for t in range(T)]
    want = theta0 - torch.stack(phis).mean(0)
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_serial_reptile_sinusoid_matches_reference():
    torch.manual_seed(1)
    model = mlp((16, 16)).double()
    T, N, eps = 4, 10, 0.3
    x = torch.rand(T, N, 1, dtype=torch.float64) * 10 - 5
    y = torch.sin(x) * torch.rand(T, 1, 1, dtype=torch.float64)
    learner = Reptile(model, inner_lr=0.0625, inner_steps=3, variant="serial", outer_lr=eps, inner_data="all")
    theta0 = _flat(p.detach() for p in model.parameters())
    learner.meta_step(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    got = _flat(p.grad for p in model.parameters())
    # the serial algorithm by hand: tasks in turn, each from the previous task's result
    theta = theta0.clone()
    shapes = [p.shape for p in model.parameters()]
    for t in range(T):
        with torch.no_grad():
            i = 0
            for p, s in zip(model.parameters(), shapes):
                p.copy_(theta[i:i + s.numel()].view(s))
                i += s.numel()
        phi = _flat(_sgd(model, x[t], y[t], 0.0625, 3, F.mse_loss))
        theta = theta + eps * (phi - theta)
    want = (theta0 - theta) / eps
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_reptile_minibatches_and_outer_sgd_step():
    torch.manual_seed(2)
    model = mlp((8,)).double()
    x = torch.randn(2, 10, 1, dtype=torch.float64)
    y = torch.randn(2, 10, 1, dtype=torch.float64)
    learner = Reptile(model, inner_lr=0.125, inner_steps=3, inner_batch=4)
    theta0 = _flat(p.detach().clone() for p in model.parameters())
    learner.meta_step(x, y, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # eps = 1: theta becomes mean phi
    opt.step()
    theta1 = _flat(p.detach() for p in model.parameters())
    assert not torch.allclose(theta0, theta1)


def test_reptile_bad_settings():
    with pytest.raises(ValueError, match="outer_lr"):
        Reptile(mlp(), variant="serial")
    with pytest.raises(ValueError, match="variant"):
        Reptile(mlp(), variant="parallel")
    with pytest.raises(ValueError, match="inner_batch"):
        Reptile(mlp(), inner_batch=0)
