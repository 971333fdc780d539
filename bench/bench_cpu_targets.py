"""The CPU speed targets (issues 10 and 20), measured side by side in one run: fastmaml's engine
against learn2learn and torch.func (and any other bench_meta_step implementation), at each inner-step
count K and thread count, with the whole step's GFLOP/s against a measured GEMM peak.

For each workload (``omniglot-5w1s-train``: the omniglot-5w1s config's training batch, 5 support
and 5 query images per task; ``omniglot-5w1s``: the standard workload, 15 queries per class;
``omniglot-mlp-5w1s``: the paper's network without convolutions, its training batch) at T = 32,
second order, every K of ``--steps`` and every thread count, the implementations are run in
INTERLEAVED rounds (round r runs every implementation once, in a rotated order, each in a fresh
subprocess of bench/bench_meta_step.py's worker that reports the median of ``--steps-per-round``
timed steps), so that this shared machine's load drifts hit them alike; the reported time is the
median over rounds. Every implementation's meta-gradient is checked against the reference computed
in float64 (same seeds): within max(1e-3, 3x the float32 reference's own error). All implementations
adapt every parameter (BatchNorm's too: ``adapt_bn=True`` for fastmaml, as learn2learn does).

FLOPs: the fused path's convolutions and linear layers counted from the shapes of every layer-kernel
call of one meta-step (multiply-add = 2 FLOPs; elementwise work not counted), divided by the fused
step's time. Peak: the median GFLOP/s of a 1024 x 1024 x 1024 float32 ``torch.mm`` at the same
thread count.

``--pause PID`` stops that process (SIGSTOP) for the whole measurement and resumes it (SIGCONT) at
the end, also on an error: a training run sharing the machine must not hold a core meanwhile.

Run it in the benchmark venv (learn2learn): ``.venv-bench/bin/python bench/bench_cpu_targets.py``.
Writes bench/results/<name>_<cpu>.json (default name ``cpu_targets``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from common import machine, table, write_json  # noqa: E402


def worker(cfg: Dict[str, object], timeout: float = 900.0) -> Dict[str, object]:
    cmd = [sys.executable, os.path.join(HERE, "bench_meta_step.py"), "--worker", json.dumps(cfg)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_gflops(threads: int, n: int = 1024, repeats: int = 7) -> float:
    code = (f"import torch, time; torch.set_num_threads({threads}); a = torch.randn({n}, {n}); b = torch.randn({n}, {n});"
            "[torch.mm(a, b) for _ in range(3)]; ts = []\n"
            f"for _ in range({repeats}):\n t = time.perf_counter(); torch.mm(a, b); ts.append(time.perf_counter() - t)\n"
            f"ts.sort(); print(2 * {n} ** 3 / ts[len(ts) // 2] / 1e9)")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return float(out.stdout.strip())


def fused_flops(workload: str, T: int, K: int) -> int:
    """FLOPs of the convolutions and linear layers of one fused meta-step, from the kernel calls."""
    import fastmaml
    import fastmaml.layers.backends as L
    from fastmaml.layers import linear as R  # the Linear's torch kernels (their bmm calls are counted)
    from fastmaml.layers.runner import FusedModel
    from bench_meta_step import WORKLOADS, build

    count = [0]
    base = L.layer_kernels(torch.device("cpu"))

    def conv_flops(x, w, stride, padding):
        H, W = x.shape[-2:]
        Ho = (H + 2 * padding - w.shape[-2]) // stride + 1
        Wo = (W + 2 * padding - w.shape[-1]) // stride + 1
        return 2 * x.shape[0] * x.shape[1] * w.shape[1] * w.shape[2] * w.shape[3] * w.shape[4] * Ho * Wo

    def fwd(x, w, b, stride, padding):
        count[0] += conv_flops(x, w, stride, padding)
        return base.conv2d_forward(x, w, b, stride, padding)

    def bwd(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        count[0] += conv_flops(x, w, stride, padding) * (int(need_dx) + int(need_dw))
        return base.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)

    ns = L._namespace("counting", **{fn: getattr(base, fn) for fn in L.SWAPPABLE})
    ns.conv2d_forward, ns.conv2d_backward = fwd, bwd
    mm = torch.bmm
    baddbmm = torch.baddbmm

    def bmm(a, b, **kw):
        count[0] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return mm(a, b, **kw)

    def baddbmm_c(c, a, b, **kw):
        count[0] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return baddbmm(c, a, b, **kw)

    model, batch = build(workload, T, "cpu")
    learner = fastmaml.MAML(model, inner_lr=WORKLOADS[workload]["inner_lr"], inner_steps=K, adapt_bn=True,
                            batching="fused")
    runner = learner.engine.runner  # the fused runner, on the counting kernels for every device
    counting = FusedModel(runner.model, runner.layout, runner.nodes, ns)
    runner.model_on = lambda device: counting
    R.torch = type("T", (), {"bmm": staticmethod(bmm), "baddbmm": staticmethod(baddbmm_c),
                             "__getattr__": lambda self, k: getattr(torch, k)})()
    try:
        learner.meta_step(*batch)
    finally:
        R.torch = torch
    return count[0]


def finish(rows: List[Dict[str, object]], peaks: Dict[int, float], args) -> str:
    """Ratios, scaling and the gradient verdict for the rows so far; prints the table and writes
    the JSON (after every workload and thread count, so that a run cut short keeps what it measured)."""
    for row in rows:
        same = [x for x in rows if x["workload"] == row["workload"] and x["threads"] == row["threads"]
                and x["K"] == row["K"]]
        for other in ("learn2learn", "torch_func", "engine-loop"):
            o = next((x for x in same if x["impl"] == other), None)
            if o is not None:
                row[f"speedup_vs_{other}"] = round(o["ms"] / row["ms"], 3)
        one = next((x for x in rows if x["workload"] == row["workload"] and x["impl"] == row["impl"]
                    and x["threads"] == 1 and x["K"] == row["K"]), None)
        if one is not None and row["threads"] != 1:
            row["scaling_vs_1_thread"] = round(one["ms"] / row["ms"], 3)
        tol = max(1e-3, 3 * (row["ref32_rel_err"] or 0))
        row["same_gradient"] = row["grad_rel_err"] is not None and row["grad_rel_err"] <= tol
    cols = ["workload", "K", "threads", "impl", "ms", "speedup_vs_learn2learn", "speedup_vs_torch_func",
            "scaling_vs_1_thread", "gflops", "fraction_of_peak", "grad_rel_err", "same_gradient"]
    print(table(rows, cols))
    path = write_json(f"{args.name}_cpu", dict(machine=machine("cpu"), gemm_peak_gflops=peaks,
                                               load_average_end=os.getloadavg(), paused_pid=args.pause,
                                               rows=rows,
                                               method=__doc__.split("\n\n")[1]), args.out)
    return path


@contextlib.contextmanager
def paused(pid):
    """SIGSTOP ``pid`` (when given) for the block, SIGCONT after it, also on an error."""
    if pid:
        os.kill(pid, signal.SIGSTOP)
        print(f"paused process {pid} (SIGSTOP) for the measurement", flush=True)
    try:
        yield
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
            print(f"resumed process {pid} (SIGCONT)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["omniglot-5w1s-train", "omniglot-5w1s", "omniglot-mlp-5w1s"])
    ap.add_argument("--impls", default="engine,learn2learn,torch_func")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="inner-step counts K")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="cpu_targets")
    ap.add_argument("--pause", type=int, default=0, metavar="PID",
                    help="a process to SIGSTOP during the measurement (SIGCONT at the end)")
    args = ap.parse_args()
    with paused(args.pause):
        return run(args)


def run(args) -> int:
    impls = [i for i in args.impls.split(",") if i]
    tmp = tempfile.mkdtemp(prefix="fm_cpu_targets_")
    rows: List[Dict[str, object]] = []
    peaks = {t: gemm_gflops(t) for t in args.threads}
    print("GEMM peak (1024^3 float32 mm):", {t: round(v, 1) for t, v in peaks.items()}, "GFLOP/s", flush=True)
    for workload in args.workloads:
        for K in args.steps:
            flops = fused_flops(workload, args.tasks, K)
            base = dict(workload=workload, tasks=args.tasks, steps=K, first_order=False, device="cpu")
            oracle_path = os.path.join(tmp, f"{workload}_{K}_oracle.pt")
            ref64 = worker(dict(base, impl="reference", dtype="float64", repeats=0, grad_path=oracle_path,
                                key="oracle"))
            if "error" in ref64:
                print("oracle failed:", ref64["error"], file=sys.stderr)
                return 1
            oracle = torch.load(oracle_path)
            ref32_path = os.path.join(tmp, f"{workload}_{K}_ref32.pt")
            worker(dict(base, impl="reference", repeats=0, grad_path=ref32_path, key="ref32", threads=1))
            ref_err = float((torch.load(ref32_path) - oracle).norm() / oracle.norm())
            for threads in args.threads:
                times: Dict[str, List[float]] = {i: [] for i in impls}
                errs: Dict[str, float] = {}
                for r in range(args.rounds):
                    order = impls[r % len(impls):] + impls[:r % len(impls)]
                    for impl in order:
                        gpath = os.path.join(tmp, f"{workload}_{K}_{threads}_{impl}.pt")
                        res = worker(dict(base, impl=impl, threads=threads, repeats=args.steps_per_round, warmup=1,
                                          grad_path=gpath, key=impl))
                        if "error" in res:
                            print(f"{workload} K={K} t={threads} {impl}: {res['error']}", file=sys.stderr)
                            continue
                        times[impl].append(res["median_s"])
                        if impl not in errs:
                            errs[impl] = float((torch.load(gpath) - oracle).norm() / oracle.norm())
                        print(f"{workload} K={K} threads={threads} round {r} {impl}: {res['median_s'] * 1e3:.0f} ms",
                              flush=True)
                for impl in impls:
                    if not times[impl]:
                        continue
                    ms = statistics.median(times[impl]) * 1e3
                    row = dict(workload=workload, T=args.tasks, K=K, threads=threads, impl=impl, ms=round(ms, 1),
                               rounds=len(times[impl]), ms_all=[round(t * 1e3, 1) for t in times[impl]],
                               grad_rel_err=errs.get(impl), ref32_rel_err=ref_err)
                    if impl == "engine":
                        row["gflops"] = round(flops / (ms / 1e3) / 1e9, 2)
                        row["gemm_peak_gflops"] = round(peaks[threads], 1)
                        row["fraction_of_peak"] = round(row["gflops"] / peaks[threads], 3)
                        row["flops_per_step"] = flops
                    rows.append(row)
                finish(rows, peaks, args)
    path = finish(rows, peaks, args)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
