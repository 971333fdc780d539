"""higher's examples/maml-omniglot.py workload in its fastmaml forms (docs/porting.md, example 3).

5-way 5-shot Omniglot (28x28), 15 queries per class, higher's net (3 blocks of unpadded 3x3 conv 64,
BatchNorm (momentum 1), ReLU, 2x2 max-pool; linear head), 5 inner SGD steps at lr 0.1 adapting every
parameter, 32 tasks per meta-step, Adam at 1e-3. higher's script calls ``qry_loss.backward()`` once per
task: its meta-gradient is the SUM over tasks of the query losses' gradients, kept here.

    python examples/higher_maml_omniglot.py --mode batched | compat [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.compat import higher

sys.path.insert(0, os.path.dirname(__file__))
from _omniglot import omniglot_tasks  # noqa: E402


def higher_net(ways: int, hidden: int = 64) -> nn.Module:
    def block(c_in):
        return [nn.Conv2d(c_in, hidden, 3), nn.BatchNorm2d(hidden, momentum=1, affine=True), nn.ReLU(inplace=True),
                nn.MaxPool2d(2, 2)]
    return nn.Sequential(*block(1), *block(hidden), *block(hidden), nn.Flatten(), nn.Linear(hidden, ways))


def meta_step_compat(net, meta_opt, batch, steps):
    """higher's training loop, unchanged but for the import."""
    sx, sy, qx, qy = batch
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    meta_opt.zero_grad()
    losses, accs = [], []
    for t in range(sx.shape[0]):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fnet(sx[t]), sy[t]))
            logits = fnet(qx[t])
            qry_loss = F.cross_entropy(logits, qy[t])
            losses.append(qry_loss.detach())
            accs.append((logits.argmax(-1) == qy[t]).float().mean())
            qry_loss.backward()
    meta_opt.step()
    return float(torch.stack(losses).mean()), float(torch.stack(accs).mean())


def meta_step_batched(learner, meta_opt, batch, steps):
    """The port: the same objective (sum over tasks of each task's mean query CE), all tasks at once."""
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    meta_opt.zero_grad()
    fast = learner.adapt(sx, sy, steps=steps, create_graph=True)
    logits = learner(fast, qx)
    per_task = F.cross_entropy(logits.flatten(0, 1), qy.flatten(), reduction="none").view(T, -1).mean(1)
    per_task.sum().backward()
    meta_opt.step()
    return per_task.mean().item(), float((logits.argmax(-1) == qy).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["batched", "compat"], default="batched")
    p.add_argument("--iterations", type=int, default=100 * 10)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="2 iterations, 2 tasks, 2 steps, 2 queries, hidden 8")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.tiny:
        a.iterations, a.tasks, a.steps, a.queries, a.hidden = 2, 2, 2, 2, 8
    torch.manual_seed(a.seed)
    tasks = omniglot_tasks(a.ways, a.shots, a.queries, a.seed)
    net = higher_net(a.ways, a.hidden)
    if a.mode == "compat":
        meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        step = lambda batch: meta_step_compat(net, meta_opt, batch, a.steps)  # noqa: E731
    else:
        learner = fastmaml.MAML(net, inner_lr=1e-1, inner_steps=a.steps, adapt_bn=True)
        meta_opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
        step = lambda batch: meta_step_batched(learner, meta_opt, batch, a.steps)  # noqa: E731
    history = []
    for it in range(a.iterations):
        history.append(step(tasks.sample(a.tasks)))
        if it % 10 == 0 or it == a.iterations - 1:
            print(f"iteration {it}: query loss {history[-1][0]:.4f} accuracy {history[-1][1]:.3f}")
    return history


if __name__ == "__main__":
    main()
