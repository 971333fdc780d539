"""The MAML family side by side, one run: seconds per meta-step on the standard workload.

ANIL (fastmaml.ANIL: the body once per task and set, the head's inner loop on the engine) against
adapt-everything MAML (fastmaml.MAML on the fused path) and against MAML with a head-only parameter
filter (``adapt=['classifier.*']``: the same ANIL mathematics, but the body recomputed at every inner
step and in the reverse pass); also FOMAML, Reptile (batched, K SGD steps) and iMAML (K proximal steps
+ 5 CG steps) for scale. conv4 (64 filters, BatchNorm, max-pool), 28x28 inputs, 5-way 1-shot, 15
queries per class, second order. Prints a table with ratios to MAML and writes
bench/results/algorithms_<device>.json.

    python bench/bench_algorithms.py [--tasks 32] [--steps 1 5] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import RESULTS, machine, median_time  # noqa: E402

from fastmaml import ANIL, IMAML, MAML, Reptile  # noqa: E402
from fastmaml.models import conv4  # noqa: E402


def batch(T: int, ways: int, shots: int, queries: int, device: str):
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(T, ways * shots, 1, 28, 28, generator=g).to(device)
    qx = torch.randn(T, ways * queries, 1, 28, 28, generator=g).to(device)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous().to(device)
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous().to(device)
    return sx, sy, qx, qy


def learners(K: int):
    def model():
        torch.manual_seed(0)
        return conv4(5)

    return {
        "MAML (adapt all)": lambda: MAML(model(), inner_lr=0.4, inner_steps=K),
        "MAML, head-only filter": lambda: MAML(model(), inner_lr=0.4, inner_steps=K,
                                               adapt=lambda n, p: n.startswith("classifier.")),
        "ANIL": lambda: ANIL(model(), inner_lr=0.4, inner_steps=K),
        "FOMAML": lambda: MAML(model(), inner_lr=0.4, inner_steps=K, first_order=True),
        "Reptile (batched)": lambda: Reptile(model(), inner_lr=0.1, inner_steps=K),
        "iMAML (5 CG)": lambda: IMAML(model(), inner_lr=0.1, inner_steps=K, lam=2.0, cg_steps=5),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of the learners (names as printed)")
    args = ap.parse_args()
    dev = args.device
    sx, sy, qx, qy = batch(args.tasks, 5, 1, 15, dev)
    rows = []
    for K in args.steps:
        base = None
        for name, make in learners(K).items():
            if args.only and name not in args.only:
                continue
            learner = make().to(dev)
            path = learner.execution_path

            def step():
                for p in learner.parameters():
                    p.grad = None
                learner.meta_step(sx, sy, qx, qy)

            t = median_time(step, dev, repeats=args.repeats, warmup=1)
            sec = t["median_s"]
            if name.startswith("MAML (adapt all)"):
                base = sec
            rows.append({"learner": name, "K": K, "seconds": sec, "min": t["min_s"], "max": t["max_s"],
                         "speedup_vs_maml": (base / sec) if base else None, "path": path})
            print(f"K={K}  {name:<24} {sec * 1e3:9.1f} ms   x{(base / sec) if base else float('nan'):5.2f} vs MAML"
                  f"   [{path.split(':')[0]}]", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"algorithms_{dev.split(':')[0]}.json")
    with open(out, "w") as f:
        json.dump({"machine": machine(dev), "workload": {"model": "conv4-64", "tasks": args.tasks, "ways": 5,
                   "shots": 1, "queries": 15, "second_order": True}, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
