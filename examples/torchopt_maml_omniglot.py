"""TorchOpt's examples/few-shot/maml_omniglot.py workload in its fastmaml forms (docs/porting.md, 4).

The same workload as higher's example (5-way 5-shot, 15 queries, higher's net, 5 inner steps of SGD at
lr 0.1 by ``torchopt.MetaSGD``, 32 tasks, Adam at 1e-3), but TorchOpt's script stacks the query
losses and backpropagates their MEAN over tasks. ``--mode compat`` runs TorchOpt's loop (MetaSGD +
extract_state_dict / recover_state_dict) unchanged but for the import (fastmaml.compat.torchopt);
``--mode batched`` replaces it by one batched call.

    python examples/torchopt_maml_omniglot.py --mode batched | compat [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.compat import torchopt

sys.path.insert(0, os.path.dirname(__file__))
from _omniglot import omniglot_tasks  # noqa: E402
from higher_maml_omniglot import higher_net  # noqa: E402


def meta_step_compat(net, inner_opt, meta_opt, batch, steps):
    """TorchOpt's training loop, unchanged but for the import."""
    sx, sy, qx, qy = batch
    meta_opt.zero_grad()
    qry_losses, qry_accs = [], []
    net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
    for t in range(sx.shape[0]):
        for _ in range(steps):
            inner_opt.step(F.cross_entropy(net(sx[t]), sy[t]))
        logits = net(qx[t])
        qry_losses.append(F.cross_entropy(logits, qy[t]))
        qry_accs.append((logits.argmax(-1) == qy[t]).float().mean())
        torchopt.recover_state_dict(net, net_state_dict)
        torchopt.recover_state_dict(inner_opt, optim_state_dict)
    loss = torch.mean(torch.stack(qry_losses))
    loss.backward()
    meta_opt.step()
    return loss.item(), float(torch.stack(qry_accs).mean())


def meta_step_batched(learner, meta_opt, batch, steps):
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    meta_opt.zero_grad()
    fast = learner.adapt(sx, sy, steps=steps, create_graph=True)
    logits = learner(fast, qx)
    qry_losses = F.cross_entropy(logits.flatten(0, 1), qy.flatten(), reduction="none").view(T, -1).mean(1)
    qry_losses.mean().backward()   # TorchOpt: torch.mean(torch.stack(qry_losses)).backward()
    meta_opt.step()
    return qry_losses.mean().item(), float((logits.argmax(-1) == qy).float().mean())


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
        inner_opt = torchopt.MetaSGD(net, lr=1e-1)
        step = lambda batch: meta_step_compat(net, inner_opt, meta_opt, batch, a.steps)  # noqa: E731
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
