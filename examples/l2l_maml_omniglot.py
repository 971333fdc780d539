"""learn2learn's examples/vision/maml_omniglot.py workload in its fastmaml forms (docs/porting.md, 2).

5-way 1-shot Omniglot (28x28), learn2learn's OmniglotCNN (4 blocks of stride-2 3x3 conv, BatchNorm,
ReLU; mean over space; linear head; here ``fastmaml.models.Conv4(max_pool=False)``), one inner step at
lr 0.5 adapting every parameter (BatchNorm's too: ``adapt_bn=True``), 32 tasks per meta-step, Adam at
0.003, the query loss averaged over tasks. learn2learn's script queries ``shots`` examples per class.

    python examples/l2l_maml_omniglot.py --mode batched | compat [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.compat import learn2learn as l2l
from fastmaml.models import Conv4

sys.path.insert(0, os.path.dirname(__file__))
from _omniglot import omniglot_tasks  # noqa: E402


def accuracy(logits, y):
    return (logits.argmax(-1) == y).float().mean()


def meta_step_compat(maml, opt, batch, steps):
    """learn2learn's fast_adapt loop, unchanged but for the import."""
    sx, sy, qx, qy = batch
    opt.zero_grad()
    err, acc = 0.0, 0.0
    for t in range(sx.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        out = learner(qx[t])
        err = err + F.cross_entropy(out, qy[t])
        acc = acc + accuracy(out, qy[t])
    (err / sx.shape[0]).backward()
    opt.step()
    return (err / sx.shape[0]).item(), float(acc / sx.shape[0])


def meta_step_batched(learner, opt, batch, steps):
    """The port: all tasks at once, same objective (mean over tasks of each task's mean CE)."""
    sx, sy, qx, qy = batch
    opt.zero_grad()
    fast = learner.adapt(sx, sy, steps=steps, create_graph=True)
    out = learner(fast, qx)                                   # [T, M, ways]
    loss = F.cross_entropy(out.flatten(0, 1), qy.flatten())   # equal M per task: the mean over tasks
    loss.backward()
    opt.step()
    return loss.item(), float(accuracy(out, qy))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["batched", "compat"], default="batched")
    p.add_argument("--iterations", type=int, default=60000)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="2 iterations, 2 tasks, hidden 8")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    if a.tiny:
        a.iterations, a.tasks, a.hidden = 2, 2, 8
    torch.manual_seed(a.seed)
    tasks = omniglot_tasks(a.ways, a.shots, a.shots, a.seed)
    model = Conv4(a.ways, hidden=a.hidden, max_pool=False)
    if a.mode == "compat":
        maml = l2l.algorithms.MAML(model, lr=0.5, first_order=False)
        opt = torch.optim.Adam(maml.parameters(), 0.003)
        step = lambda batch: meta_step_compat(maml, opt, batch, a.steps)  # noqa: E731
    else:
        learner = fastmaml.MAML(model, inner_lr=0.5, inner_steps=a.steps, adapt_bn=True)
        opt = torch.optim.Adam(learner.parameters(), 0.003)
        step = lambda batch: meta_step_batched(learner, opt, batch, a.steps)  # noqa: E731
    history = []
    for it in range(a.iterations):
        history.append(step(tasks.sample(a.tasks)))
        if it % 100 == 0 or it == a.iterations - 1:
            print(f"iteration {it}: meta-train error {history[-1][0]:.4f} accuracy {history[-1][1]:.3f}")
    return history


if __name__ == "__main__":
    main()
