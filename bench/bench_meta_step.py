"""Time and peak memory of one MAML meta-step: fastmaml's engine against its reference, torch.func,
and (where installed) learn2learn, higher and TorchOpt, on the same computation.

Every (workload, T, K, implementation) runs in a fresh subprocess, which
  1. builds the model from one seed and a task batch from another (same for every implementation),
  2. computes one meta-gradient and hands it to the parent, which checks that every implementation
     computed the same meta-gradient as fastmaml's reference (float32 tolerance) before its times
     are reported,
  3. times ``--repeats`` meta-steps after a warm-up (median), and
  4. reports its peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the excess of
     the process's peak resident set over its baseline before the first meta-step.

Workloads (engine.md section 7): ``omniglot-5w1s`` is the paper's Omniglot network (4 x 3x3 conv 64,
BatchNorm, ReLU, 2x2 max-pool) on 28x28 inputs, 5-way 1-shot, 15 queries per class;
``omniglot-20w5s`` the same 20-way 5-shot; ``sinusoid`` the 1-40-40-1 MLP, 10-shot, 10 queries.
All parameters are adapted (BatchNorm's too, as the baselines do), plain SGD, second order unless
``--first-order``. Inputs are random (speed does not depend on pixel values).

usage:
  python bench/bench_meta_step.py                         # the standard workload, T=32, K=1 and 5
  python bench/bench_meta_step.py --impls engine,reference,torch_func,learn2learn --steps 1 5 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from common import device_tag, machine, median_time, table, write_json  # noqa: E402

WORKLOADS = {
    "omniglot-5w1s": dict(kind="conv", ways=5, shots=1, queries=15, inner_lr=0.4),
    "omniglot-20w5s": dict(kind="conv", ways=20, shots=5, queries=15, inner_lr=0.1),
    "sinusoid": dict(kind="mlp", shots=10, queries=10, inner_lr=0.01),
}
ENGINE_IMPLS = {
    # name: MAML keyword arguments
    "engine": {},
    "engine-loop": {"batching": "loop"},
    "engine-vmap": {"batching": "vmap"},
    "engine-recompute": {"memory": "recompute"},
    "engine-kernels-torch": {"kernels": "torch"},
    "engine-kernels-cpp": {"kernels": "cpp"},
    "engine-kernels-triton": {"kernels": "triton"},
    "engine-kernels-cuda": {"kernels": "cuda"},
    "reference": {"backend": "reference"},
}
BASELINE_IMPLS = ("torch_func", "torch_func_bnfix", "learn2learn", "higher", "torchopt")


def build(workload: str, T: int, device: str, seed: int = 0):
    """(model, (support_x, support_y, query_x, query_y)) for a workload."""
    from models import omniglot_conv4, sinusoid_mlp

    w = WORKLOADS[workload]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if w["kind"] == "conv":
        model = omniglot_conv4(w["ways"])
        n_s, n_q = w["ways"] * w["shots"], w["ways"] * w["queries"]
        sx = torch.randn(T, n_s, 1, 28, 28, generator=g)
        qx = torch.randn(T, n_q, 1, 28, 28, generator=g)
        sy = torch.arange(w["ways"]).repeat_interleave(w["shots"]).expand(T, -1).contiguous()
        qy = torch.arange(w["ways"]).repeat_interleave(w["queries"]).expand(T, -1).contiguous()
    else:
        model = sinusoid_mlp()
        amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(T, 1, 1).uniform_(0.0, 3.14159, generator=g)
        sx = torch.empty(T, w["shots"], 1).uniform_(-5, 5, generator=g)
        qx = torch.empty(T, w["queries"], 1).uniform_(-5, 5, generator=g)
        sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
    batch = tuple(t.to(device) for t in (sx, sy, qx, qy))
    return model.to(device), batch


def make_step(impl: str, model, inner_lr: float, K: int, first_order: bool):
    """A function running one meta-step that leaves the meta-gradient in the model's ``.grad``."""
    params = list(model.parameters())
    if impl in ENGINE_IMPLS:
        import fastmaml

        learner = fastmaml.MAML(model, inner_lr=inner_lr, inner_steps=K, first_order=first_order,
                                adapt_bn=True, **ENGINE_IMPLS[impl])

        def step(*batch):
            for p in params:
                p.grad = None
            return learner.meta_step(*batch).loss

        return step
    import baselines

    return baselines.make(impl, model, inner_lr, K, first_order)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(cfg: Dict[str, object]) -> Dict[str, object]:
    """Runs in the subprocess: one implementation on one configuration."""
    device = cfg["device"]
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    w = WORKLOADS[cfg["workload"]]
    model, batch = build(cfg["workload"], cfg["tasks"], device)
    step = make_step(cfg["impl"], model, w["inner_lr"], cfg["steps"], cfg["first_order"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss()
    t0 = time.perf_counter()
    step(*batch)
    first = time.perf_counter() - t0
    grad = torch.cat([p.grad.detach().flatten().double().cpu() for p in model.parameters()])
    torch.save(grad, cfg["grad_path"])
    timing = median_time(lambda: step(*batch), device, repeats=cfg["repeats"], warmup=0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    return dict(first_step_s=first, peak_bytes=peak, **timing)


def run_one(cfg: Dict[str, object], timeout: float) -> Dict[str, object]:
    fd, grad_path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    cfg = dict(cfg, grad_path=grad_path)
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            return dict(error=tail[0][:300])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["grad"] = torch.load(grad_path, weights_only=True)
        return out
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    finally:
        os.unlink(grad_path)


def available_impls(device: str) -> Dict[str, object]:
    """Every implementation with True or the reason it cannot run."""
    import fastmaml.kernels as K

    out: Dict[str, object] = {}
    backends = K.available_backends()
    for name, kw in ENGINE_IMPLS.items():
        kb = kw.get("kernels")
        if kb is None:
            out[name] = True
        elif backends.get(kb) != "available":
            out[name] = backends.get(kb)
        elif kb == "cpp" and device != "cpu" or kb == "cuda" and device == "cpu":
            out[name] = f"the {kb} kernels do not run on {device}"
        elif kb == "triton" and device == "cpu":
            out[name] = "Triton runs on the CPU only in its (slow) interpreter"
        else:
            out[name] = True
    try:
        import baselines

        out.update(baselines.available())
    except ImportError as e:
        out.update({b: f"bench/baselines.py failed to import: {e}" for b in BASELINE_IMPLS})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", nargs="+", default=["omniglot-5w1s"], choices=sorted(WORKLOADS))
    ap.add_argument("--tasks", nargs="+", type=int, default=[32])
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--impls", default="engine,reference,torch_func,torch_func_bnfix,learn2learn,higher,torchopt",
                    help="comma-separated; unavailable ones are reported and skipped")
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--name", default="meta_step", help="JSON file name stem")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    avail = available_impls(args.device)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in avail]
    if unknown:
        ap.error(f"unknown implementations {unknown}; known: {sorted(avail)}")
    skipped = {i: avail[i] for i in impls if avail[i] is not True}
    impls = [i for i in impls if avail[i] is True]
    for i, why in skipped.items():
        print(f"skipping {i}: {why}", file=sys.stderr)
    # The reference runs first: it is the oracle for the gradient check.
    impls.sort(key=lambda i: i != "reference")

    rows: List[Dict[str, object]] = []
    dev = machine(args.device)

    def save(rows, partial: bool) -> str:
        return write_json(f"{args.name}_{device_tag(args.device)}", {
            "machine": dev, "args": vars(args), "skipped": skipped, "rows": rows, "partial": partial,
        }, args.out)

    for workload in args.workloads:
        for T in args.tasks:
            for K in args.steps:
                oracle = None
                for impl in impls:
                    cfg = dict(workload=workload, tasks=T, steps=K, impl=impl, device=args.device,
                               first_order=args.first_order, repeats=args.repeats, threads=args.threads)
                    r = run_one(cfg, args.timeout)
                    row = dict(workload=workload, T=T, K=K, impl=impl)
                    if "error" in r:
                        row["error"] = r["error"]
                        print(f"{workload} T={T} K={K} {impl}: {r['error']}", file=sys.stderr)
                        rows.append(row)
                        continue
                    grad = r.pop("grad")
                    if impl == "reference":
                        oracle = grad
                    if oracle is not None:
                        row["grad_rel_err"] = float((grad - oracle).norm() / oracle.norm())
                        row["same_gradient"] = row["grad_rel_err"] <= 1e-3
                    row.update(ms=r["median_s"] * 1e3, peak_mib=r["peak_bytes"] / 2**20,
                               min_ms=r["min_s"] * 1e3, max_ms=r["max_s"] * 1e3, first_ms=r["first_step_s"] * 1e3)
                    rows.append(row)
                    print(f"{workload} T={T} K={K} {impl}: {row['ms']:.1f} ms, {row['peak_mib']:.0f} MiB",
                          file=sys.stderr, flush=True)
                    save(rows, partial=True)  # a run cut short still leaves what it measured

    # Ratios against the reference and learn2learn of the same configuration, from this one run.
    for r in rows:
        for base in ("reference", "learn2learn", "torch_func"):
            b = next((x for x in rows if x["impl"] == base and "ms" in x and
                      (x["workload"], x["T"], x["K"]) == (r["workload"], r["T"], r["K"])), None)
            if b is not None and "ms" in r:
                r[f"speedup_vs_{base}"] = b["ms"] / r["ms"]
                r[f"memory_vs_{base}"] = r["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None
    print(f"\nMAML meta-step, second order={not args.first_order}, device={args.device} ({dev['device_name']}), "
          f"torch {dev['torch']}, threads={args.threads or torch.get_num_threads()}")
    cols = ["workload", "T", "K", "impl", "ms", "peak_mib", "speedup_vs_reference", "speedup_vs_learn2learn",
            "memory_vs_reference", "grad_rel_err", "same_gradient", "error"]
    print(table(rows, cols))
    print("wrote", save(rows, partial=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
