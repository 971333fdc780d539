"""The cost of ``MAML(bn_stats="running")`` over ``"batch"`` on the omniglot-5w1s training batch.

The paper's Omniglot network (4 x [3x3 conv 64, BatchNorm, ReLU, 2x2 max-pool], 28x28, 5 ways) with
``track_running_stats=True``; T = 32 tasks of 5 support and 5 query images (the omniglot-5w1s config:
1 shot, 1 query per class), K = 1 inner step, second order, float32. The two modes run interleaved, one
meta-step each in turn, and the medians are compared; also the statistics pass alone (what the mode
adds). Prints a table and writes JSON (machine, torch, threads) to bench/results/bn_running_<device>.json.

    python bench/bench_bn_running.py [--repeats 15] [--threads 1] [--tasks 32] [--steps 1] [--queries 1]
                                     [--malloc keep|default]

``--malloc keep`` (default) sets glibc's malloc as ``fastmaml train`` does
(:func:`fastmaml.app.run_setup.keep_freed_memory`); ``default`` leaves it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

import fastmaml


def omniglot_net(ways: int = 5) -> nn.Module:
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=True), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--queries", type=int, default=1, help="query images per class (omniglot-5w1s: 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep")
    args = ap.parse_args()
    malloc_kept = False
    if args.malloc == "keep":
        from fastmaml.app.run_setup import keep_freed_memory

        malloc_kept = keep_freed_memory()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    T, ways = args.tasks, 5
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(T, ways, 1, 28, 28, generator=g).to(dev)
    qx = torch.randn(T, ways * args.queries, 1, 28, 28, generator=g).to(dev)
    sy = torch.arange(ways).expand(T, -1).contiguous().to(dev)
    qy = torch.arange(ways).repeat_interleave(args.queries).expand(T, -1).contiguous().to(dev)

    learners = {}
    for mode in ("batch", "running"):
        torch.manual_seed(0)
        learners[mode] = fastmaml.MAML(omniglot_net(ways).to(dev), inner_lr=0.4, inner_steps=args.steps,
                                       bn_stats=mode)
    times = {m: [] for m in learners}
    stats_pass = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for r in range(args.repeats + 2):  # 2 warm-up rounds
        for mode, learner in learners.items():
            learner.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            learner.meta_step(sx, sy, qx, qy)
            sync()
            if r >= 2:
                times[mode].append(time.perf_counter() - t0)
        # the statistics pass alone: the support pass at theta_0..theta_{K-1} and the query pass at theta_K
        learner = learners["running"]
        with learner._bn_updates() as rec:
            theta = learner.engine.theta()
            sync()
            t0 = time.perf_counter()
            for k in range(args.steps):
                rec.record(theta, sx, k)
            rec.record(theta.expand(T, -1), qx, max(args.steps - 1, 0))
            sync()
            if r >= 2:
                stats_pass.append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {
        "workload": f"omniglot-5w1s training batch: T={T}, {ways} support + {ways * args.queries} query images "
                    f"per task, K={args.steps}, second order, float32",
        "execution_path": {m: l.execution_path for m, l in learners.items()},
        "median_s": med,
        "stats_pass_median_s": statistics.median(stats_pass),
        "overhead": med["running"] / med["batch"] - 1.0,
        "repeats": args.repeats,
        "threads": args.threads,
        "malloc_keep_freed_memory": malloc_kept,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "load_avg": os.getloadavg(),
    }
    print(f"{res['workload']}; {args.repeats} interleaved repeats, {args.threads} thread(s)")
    print("| bn_stats | median meta-step | path |")
    print("| --- | --- | --- |")
    for m in learners:
        print(f"| {m} | {med[m] * 1e3:.1f} ms | {res['execution_path'][m]} |")
    print(f"overhead of 'running': {res['overhead'] * 100:+.1f}% "
          f"(statistics pass alone: {res['stats_pass_median_s'] * 1e3:.1f} ms)")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"bn_running_{dev.type}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
