"""The engine really meta-learns: on the paper's sinusoid tasks, a few hundred meta-steps make one
inner step reduce the query error far below that of the un-adapted initialization."""

import math

import torch
from torch import nn

import fastmaml


def sinusoid_tasks(T: int, K: int, g: torch.Generator):
    amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(T, 2 * K, 1).uniform_(-5.0, 5.0, generator=g)
    y = amp * torch.sin(x - phase)
    return x[:, :K], y[:, :K], x[:, K:], y[:, K:]


def test_sinusoid_meta_training_makes_adaptation_work():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    learner = fastmaml.MAML(model, inner_lr=0.01, inner_steps=1)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    for _ in range(400):
        opt.zero_grad()
        learner.meta_step(*sinusoid_tasks(25, 10, g))
        opt.step()
    sx, sy, qx, qy = sinusoid_tasks(200, 10, g)
    with torch.no_grad():
        before = float((model(qx) - qy).pow(2).mean())
    after = float(learner.evaluate(sx, sy, qx, qy, steps=5).loss)
    assert after < 0.6 * before, (before, after)
