"""Peak memory and time of one meta-step versus ``task_chunk`` (issue 12).

The standard workload (docs/design.md §11): the paper's Omniglot network, 5-way 1-shot, 15 queries
per class, T tasks (default 32), K inner steps, second order, float32. Each configuration runs in a
fresh subprocess (``--probe C``: one meta-step with task_chunk=C, C=0 unchunked), which prints
``{"baseline", "peak", "seconds"}``: the peak resident set before and after the meta-step (CPU), or
``torch.cuda.max_memory_allocated`` (CUDA). The table reports the excess of the peak over the
baseline, its ratio to the unchunked one, and the median time of ``--repeats`` meta-steps.

usage: python bench/bench_task_chunk.py [--tasks 32] [--steps 1] [--chunks 32,16,8,4,2,1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def probe(args) -> None:
    import torch
    from torch import nn

    import fastmaml

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    T, ways, shots, queries = args.tasks, 5, 1, args.queries
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        c = 64
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways)).to(device)
    sx = torch.randn(T, ways * shots, 1, 28, 28, device=device)
    qx = torch.randn(T, ways * queries, 1, 28, 28, device=device)
    sy = torch.arange(ways, device=device).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways, device=device).repeat_interleave(queries).expand(T, -1).contiguous()
    chunk = None if args.probe == "0" else (args.probe if args.probe == "auto" else int(args.probe))
    learner = fastmaml.MAML(model, inner_lr=0.4, inner_steps=args.steps, task_chunk=chunk,
                            memory_budget=args.budget)
    learner._output_shape(sx)  # the one-task probe forward happens before the baseline
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        learner.meta_step(sx, sy, qx, qy)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": statistics.median(times),
                      "chunk_info": learner.chunk_info}))


def run_probe(chunk: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", chunk, "--tasks", str(args.tasks), "--steps",
           str(args.steps), "--queries", str(args.queries), "--device", args.device, "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    if args.budget and chunk == "auto":
        cmd += ["--budget", args.budget]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--chunks", default="32,16,8,4,2,1", help="task_chunk values (0 or T: unchunked; 'auto')")
    p.add_argument("--budget", default=None, help="memory_budget for 'auto'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="meta-steps per configuration (median time)")
    p.add_argument("--out", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args()
    if args.probe is not None:
        return probe(args)
    from common import device_tag, machine, table, write_json

    rows = []
    full = None
    for c in args.chunks.split(","):
        r = run_probe("0" if c == str(args.tasks) else c, args)
        excess = r["peak"] - r["baseline"]
        if full is None:
            full = excess
        rows.append({"task_chunk": c, "peak_excess_MiB": excess / 2**20, "vs_unchunked": excess / full,
                     "ms_per_step": 1e3 * r["seconds"],
                     "auto_chunk": (r["chunk_info"] or {}).get("task_chunk")})
        print(f"task_chunk={c}: {excess / 2**20:.1f} MiB, {1e3 * r['seconds']:.0f} ms", file=sys.stderr)
    cols = ["task_chunk", "peak_excess_MiB", "vs_unchunked", "ms_per_step", "auto_chunk"]
    print(f"omniglot 5-way 1-shot, {args.queries} queries/class, T={args.tasks}, K={args.steps}, second order, "
          f"float32, {args.device}, {args.threads} thread(s); peak over baseline in a fresh process per row; "
          f"time: median of {args.repeats}")
    print(table(rows, cols))
    path = write_json(f"task_chunk_{device_tag(args.device)}", {
        "machine": machine(args.device), "workload": {"tasks": args.tasks, "steps": args.steps,
                                                      "queries": args.queries, "ways": 5, "shots": 1},
        "load_average": list(os.getloadavg()), "threads": args.threads, "rows": rows,
        "note": "CPU peak = peak RSS excess over the baseline (fresh process per row); the machine is shared and "
                "noisy: times are medians"}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
