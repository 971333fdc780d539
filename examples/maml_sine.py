"""learn2learn's examples/maml_sine.py workload in its fastmaml forms (docs/porting.md, example 1).

Sinusoid regression, an MLP 1-40-40-1 (ReLU), 5 inner SGD steps at lr 0.01, 10 shots, 32 tasks per
meta-step, Adam at 0.005, mean of the query MSE over tasks.

    python examples/maml_sine.py --mode batched   # the task-batched port (fastmaml.MAML)
    python examples/maml_sine.py --mode compat    # the import swap (fastmaml.compat.learn2learn)
    python examples/maml_sine.py --tiny           # a few iterations on tiny settings (CI)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.compat import learn2learn as l2l
from fastmaml.data import Sinusoid


def sine_model(dim: int = 40) -> nn.Module:
    return nn.Sequential(nn.Linear(1, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))


def meta_step_compat(maml, opt, batch, steps):
    """learn2learn's loop, unchanged but for the import: one clone per task."""
    sx, sy, qx, qy = batch
    opt.zero_grad()
    total = 0.0
    for t in range(sx.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(sx[t]), sy[t]))
        total = total + F.mse_loss(learner(qx[t]), qy[t])
    loss = total / sx.shape[0]
    loss.backward()
    opt.step()
    return loss.item()


def meta_step_batched(learner, opt, batch, steps):
    """The port: all tasks at once; the outer loss is ours (mean over tasks of the query MSE)."""
    sx, sy, qx, qy = batch
    opt.zero_grad()
    fast = learner.adapt(sx, sy, steps=steps, create_graph=True)
    loss = F.mse_loss(learner(fast, qx), qy)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["batched", "compat"], default="batched")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--hidden", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="3 iterations, 4 tasks, 2 steps, hidden 8")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    if a.tiny:
        a.iterations, a.tasks, a.steps, a.hidden = 3, 4, 2, 8
    torch.manual_seed(a.seed)
    tasks = Sinusoid(shots=a.shots, queries=a.shots, seed=a.seed)
    model = sine_model(a.hidden)
    if a.mode == "compat":
        maml = l2l.MAML(model, lr=0.01)
        opt = torch.optim.Adam(maml.parameters(), 0.005)
        step = lambda batch: meta_step_compat(maml, opt, batch, a.steps)  # noqa: E731
    else:
        learner = fastmaml.MAML(model, inner_lr=0.01, inner_steps=a.steps)
        opt = torch.optim.Adam(learner.parameters(), 0.005)
        step = lambda batch: meta_step_batched(learner, opt, batch, a.steps)  # noqa: E731
    losses = []
    for it in range(a.iterations):
        losses.append(step(tasks.sample(a.tasks)))
        if it % 100 == 0 or it == a.iterations - 1:
            print(f"iteration {it}: meta-loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
