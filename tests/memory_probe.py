"""Peak memory of one meta-step, for a fresh process: prints JSON {"baseline": .., "peak": ..} in bytes.

usage: python memory_probe.py BACKEND K [MEMORY [STORE_BUDGET]]

The model is the paper's Omniglot network (4 x conv 64, BatchNorm, ReLU, max-pool; 28x28 inputs),
5-way 1-shot with 5 queries per class, 2 tasks, float32, second order. ``baseline`` is the peak
resident set before the meta-step (imports, model, data); ``peak`` the peak after it.
"""

import json
import resource
import sys

import torch
from torch import nn

import fastmaml


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def conv4(ways=5, hidden=64):
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
        c = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))


def main() -> None:
    backend, K = sys.argv[1], int(sys.argv[2])
    memory = sys.argv[3] if len(sys.argv) > 3 else "store"
    store_budget = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    T, ways, shots, queries = 2, 5, 1, 5
    sx = torch.randn(T, ways * shots, 1, 28, 28)
    qx = torch.randn(T, ways * queries, 1, 28, 28)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    learner = fastmaml.MAML(conv4(), inner_lr=0.4, inner_steps=K, backend=backend, memory=memory,
                            store_budget=store_budget)
    learner._output_shape(sx)  # the one-task probe forward happens before the baseline
    baseline = peak_rss()
    learner.meta_step(sx, sy, qx, qy)
    print(json.dumps({"baseline": baseline, "peak": peak_rss()}))


if __name__ == "__main__":
    main()
