"""Data-parallel scaling of meta-training: 1 versus W processes (issue 12).

The omniglot-5w1s training workload (docs/design.md §11 / configs.py): the paper's Omniglot network
(4 x conv 64, BatchNorm, ReLU, max-pool), 28x28 inputs, 5-way 1-shot, 1 query per class (the
training config), a global meta-batch of T = 32 tasks, K = 1, second order, float32, Adam. Each
process uses ``--threads`` threads (default 1: this machine has 2 cores); W processes share every
meta-batch (T/W tasks each) and run one bucketed all-reduce per iteration (gloo on the CPU, NCCL on
CUDA). Inputs are random tensors of the workload's shapes (sampling real Omniglot tasks costs
well under 1% of a step). Reported: the median seconds per iteration over ``--iters`` iterations
after ``--warmup``, tasks/s, the speedup over 1 process, the scaling efficiency (speedup / W) and the
median time of the all-reduce (with the wait it includes for the slower rank), and rank 0's CPU
time per iteration with the "CPU efficiency" it implies (1-process CPU time / (W x rank 0's CPU
time): the share of the work that was not duplicated or added by going parallel, insensitive to
other jobs competing for the cores). CPU numbers on a shared machine are noisy: medians.

usage: python bench/bench_distributed.py [--procs 1,2] [--tasks 32] [--iters 6] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import fastmaml
    from fastmaml.distributed import all_reduce_grads, backend_for, task_slice

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if world > 1:
        dist.init_process_group(backend_for(device))
    torch.manual_seed(0)
    ways, shots, queries, T = 5, 1, 1, args.tasks
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        c = 64
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways)).to(device)
    learner = fastmaml.MAML(model, inner_lr=0.4, inner_steps=args.steps)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous().to(device)
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous().to(device)
    s = task_slice(T, rank, world)
    step_times, reduce_times, cpu_times = [], [], []
    for i in range(args.warmup + args.iters):
        sx = torch.randn(T, ways * shots, 1, 28, 28, generator=g).to(device)
        qx = torch.randn(T, ways * queries, 1, 28, 28, generator=g).to(device)
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        learner.meta_step(sx[s], sy[s], qx[s], qy[s])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        all_reduce_grads(learner, weight=(s.stop - s.start) / T)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i >= args.warmup:
            cpu_times.append(time.process_time() - c0)
            step_times.append(t3 - t0)
            reduce_times.append(t2 - t1)
    if rank == 0:
        print(json.dumps({"step_s": step_times, "reduce_s": reduce_times, "cpu_s": cpu_times}))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args) -> dict:
    from fastmaml.app.distributed_train import _free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tasks", str(args.tasks), "--steps",
           str(args.steps), "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--device", args.device]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--procs", default="1,2", help="process counts to compare (the first is the baseline)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import device_tag, machine, table, write_json

    rows, base = [], None
    for w in (int(x) for x in args.procs.split(",")):
        r = run(w, args)
        t = statistics.median(r["step_s"])
        cpu = statistics.median(r["cpu_s"])
        base = base or (t, w, cpu)
        speedup = base[0] / t
        rows.append({"procs": w, "tasks_per_proc": args.tasks // w, "s_per_iter": t, "tasks_per_s": args.tasks / t,
                     "speedup": speedup, "efficiency": speedup / (w / base[1]),
                     "allreduce_ms": 1e3 * statistics.median(r["reduce_s"]),
                     "cpu_s_per_iter": cpu, "cpu_efficiency": base[2] / (cpu * w / base[1]),
                     "min_s": min(r["step_s"]), "max_s": max(r["step_s"])})
        print(f"{w} process(es): {t:.3f} s/iter", file=sys.stderr)
    print(f"omniglot-5w1s training step (T={args.tasks}, K={args.steps}, second order, Adam), {args.device}, "
          f"{args.threads} thread(s) per process; medians of {args.iters} iterations (shared, noisy machine)")
    print(table(rows, ["procs", "tasks_per_proc", "s_per_iter", "tasks_per_s", "speedup", "efficiency",
                       "allreduce_ms", "cpu_s_per_iter", "cpu_efficiency", "min_s", "max_s"]))
    path = write_json(f"distributed_{device_tag(args.device)}", {
        "machine": machine(args.device), "threads_per_process": args.threads,
        "workload": {"config": "omniglot-5w1s", "tasks": args.tasks, "steps": args.steps, "queries": 1},
        "load_average": list(os.getloadavg()), "rows": rows, "backend": "gloo" if args.device == "cpu" else "nccl",
        "note": "medians; the CPU machine is shared with other jobs, so the numbers are noisy"}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
