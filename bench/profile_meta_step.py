"""Where the time of one meta-step goes: ``torch.profiler`` over a few steps, summarised.

Prints and writes (JSON, ``profile_<impl>_<workload>_<device>.json``):
  * wall time per step, and on CUDA the summed kernel time per step and the number of kernel
    launches: when kernels keep the GPU busy for only a fraction of the wall time, the step is bound
    by the CPU that launches them (what ``MAML(cuda_graph=True)`` removes);
  * the engine's phases (``record_function`` ranges in fastmaml/engine/engine.py): support gradients (the
    inner forward and backward), the Hessian-vector products (double backward), the query gradients;
  * time by kind of operator (convolution, BatchNorm, matmul, pooling, elementwise, fused fastmaml
    ops, copies, ...), self time, device time on CUDA and CPU time on the CPU;
  * the top operators.

usage: python bench/profile_meta_step.py [--impl engine] [--workload omniglot-5w1s] [--tasks 32]
                                         [--steps 1] [--device cpu|cuda] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_meta_step import WORKLOADS, build, make_step  # noqa: E402
from common import device_tag, machine, sync, table, write_json  # noqa: E402

PHASES = ("fastmaml.support_grad", "fastmaml.hvp", "fastmaml.query_grad")
# (kind, substrings of the operator name), first match wins
KINDS = [
    ("fused fastmaml ops", ("fastmaml",)),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "bn_")),
    ("max pool", ("max_pool", "maxpool")),
    ("convolution", ("conv", "cudnn", "winograd", "implicit_gemm", "xmma", "sm90_", "fprop", "dgrad", "wgrad",
                     "depthwise")),
    ("matmul", ("mm", "gemm", "matmul", "linear", "cutlass")),
    ("loss / softmax", ("softmax", "nll", "cross_entropy", "mse")),
    ("copy / cat / split", ("copy", "cat", "split", "clone", "contiguous", "memcpy", "memset", "fill", "zero")),
    ("reduction", ("sum", "mean", "reduce", "norm")),
    ("elementwise", ("add", "mul", "sub", "div", "relu", "threshold", "where", "elementwise", "vectorized")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", default="engine")
    ap.add_argument("--workload", default="omniglot-5w1s", choices=sorted(WORKLOADS))
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="profiled meta-steps")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tf32", action="store_true", help="TF32 convolutions and matmuls (as bench_meta_step.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32

    model, batch = build(args.workload, args.tasks, args.device)
    step = make_step(args.impl, model, WORKLOADS[args.workload]["inner_lr"], args.steps, False)
    for _ in range(2):  # warm-up: cuDNN algorithm choice, Triton compilation, graph capture
        step(*batch)
    sync(args.device)

    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step(*batch)
    sync(args.device)
    wall_ms = (time.perf_counter() - t0) / args.repeats * 1e3  # unprofiled, for reference

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            step(*batch)
        sync(args.device)
    events = prof.key_averages()
    n = args.repeats

    def self_us(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    # On CUDA the averages hold CPU-side operators (their self device time is the kernels they
    # launched themselves) and the kernels again under their own names: count the operators only,
    # so that every kernel is counted once.
    cpu_side = [e for e in events if getattr(e, "device_type", torch.autograd.DeviceType.CPU)
                == torch.autograd.DeviceType.CPU]
    phases = {}
    for e in cpu_side:
        if e.key in PHASES:
            phases[e.key] = dict(calls_per_step=e.count / n, cpu_ms_per_step=e.cpu_time_total / n / 1e3)
    # Time by kind: on CUDA from the kernels themselves (a replayed CUDA graph launches kernels that
    # no CPU-side operator owns), on the CPU from the operators' self time.
    gpu = torch.autograd.DeviceType.CUDA
    timed = [e for e in events if getattr(e, "device_type", None) == gpu] if cuda else cpu_side
    by_kind: Dict[str, float] = defaultdict(float)
    for e in timed:
        if e.key not in PHASES and not e.key.startswith("ProfilerStep"):
            by_kind[kind_of(e.key)] += self_us(e) / n / 1e3
    busy_ms = sum(by_kind.values())
    ops: List[Dict[str, object]] = []
    for e in cpu_side:
        us = self_us(e)
        if us > 0 and e.key not in PHASES and not e.key.startswith("ProfilerStep"):
            ops.append(dict(op=e.key[:70], calls_per_step=e.count / n, self_ms_per_step=us / n / 1e3))
    launches = sum(e.count for e in timed) / n if cuda else None
    ops.sort(key=lambda r: -r["self_ms_per_step"])
    kinds = sorted(({"kind": k, "ms_per_step": v, "share": v / busy_ms} for k, v in by_kind.items()),
                   key=lambda r: -r["ms_per_step"])

    where = "device (kernel) time" if cuda else "CPU self time"
    print(f"{args.impl} on {args.workload}, T={args.tasks}, K={args.steps}, {args.device} "
          f"({machine(args.device)['device_name']}), torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"wall {wall_ms:.1f} ms/step (unprofiled); {where} {busy_ms:.1f} ms/step"
          + (f"; GPU busy {busy_ms / wall_ms:.0%} of the wall time; {launches:.0f} kernels/step" if cuda else ""))
    print("\nengine phases (CPU time incl. children, per step):")
    print(table([dict(phase=k, **v) for k, v in phases.items()], ["phase", "calls_per_step", "cpu_ms_per_step"]))
    print(f"\nby kind ({where}, per step):")
    print(table(kinds, ["kind", "ms_per_step", "share"]))
    print(f"\ntop {args.top} operators ({where}, per step):")
    print(table(ops[:args.top], ["op", "calls_per_step", "self_ms_per_step"]))
    name = f"profile_{args.impl}_{args.workload}_T{args.tasks}_K{args.steps}_{device_tag(args.device)}"
    path = write_json(name, {
        "machine": machine(args.device), "args": vars(args), "wall_ms_per_step": wall_ms,
        "busy_ms_per_step": busy_ms, "kernel_launches_per_step": launches, "phases": phases,
        "by_kind": kinds, "top_ops": ops[:50],
    }, args.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
