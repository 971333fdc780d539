"""Benchmark of the data layer: episodes per second, cache build and load times.

    FASTMAML_DATA=/work/shared/data python bench/bench_data.py [--cold] [--seconds 2]

Measures, for each torch intra-op thread count in ``--threads`` (default: torch's default and 1):

* Omniglot (Vinyals train split, 28x28, rotations: 4112 classes) ``sample(T)`` throughput in tasks
  per second for 5-way/20-way, 1-/5-shot, 15 queries per class, at several meta-batch sizes T;
* fixed evaluation episodes (``episodes(600, batch=32)``) throughput;
* sinusoid (10-shot, 10 queries) and a mini-ImageNet-shaped synthetic sampler (uint8
  [64, 100, 3, 84, 84], 5-way 1-shot 15 queries, normalised);
* the rate per second of wall time and per second of this process's CPU time (on a shared, busy
  machine the first is what was obtained, the second what one idle core would give, 1 thread);
* the Omniglot cache: the time to construct a dataset from a warm cache, and with ``--cold`` the
  time to build the cache from the zips (decoding all 32,460 PNGs) into a temporary folder.

Prints a table and writes ``bench/results/data_<hostname>.json`` with the machine's details
(platform, CPU model and count, torch version, load average before and after: the numbers of a
shared, busy machine are lower bounds). The target is >= 10,000 Omniglot 5-way 1-shot 15-query
tasks/s; the verdict line reports the best thread setting at T = 32 (the MAML paper's meta-batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastmaml.data import Omniglot, Sinusoid, TaskSampler  # noqa: E402
from fastmaml.data import omniglot_files  # noqa: E402

TARGET = 10_000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def throughput(fn, tasks_per_call: int, seconds: float):
    """(tasks/s of wall time, tasks/s of this process's CPU time, median ms per call, calls) of
    ``fn()`` run for about ``seconds``. On a busy machine the wall-clock rate is what this process
    got; the CPU-time rate is what it would get with its cores to itself (for one thread)."""
    for _ in range(3):
        fn()
    times = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= seconds and len(times) >= 5:
            break
    wall = time.perf_counter() - start
    cpu = max(time.process_time() - cpu0, 1e-9)
    n = tasks_per_call * len(times)
    return n / wall, n / cpu, 1e3 * statistics.median(times), len(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="Omniglot folder (default: $FASTMAML_DATA/omniglot, then ~/.cache/fastmaml)")
    p.add_argument("--cache-dir", default=None, help="cache folder for the warm runs (default: the library's)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: torch's default,1)")
    p.add_argument("--cold", action="store_true", help="also time building the Omniglot cache from the zips")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/data_<hostname>.json)")
    args = p.parse_args(argv)

    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({default_threads, 1}, reverse=True)
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname() or cpu_model())
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"data_{host}.json"
    result = {
        "machine": {
            "hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_default_threads": default_threads, "loadavg_start": loadavg(),
        },
        "target_tasks_per_s": TARGET,
        "cache": {},
        "rows": [],
    }
    rows = result["rows"]

    # ---- Omniglot cache ------------------------------------------------------------------------
    omni = None
    try:
        data_dir = omniglot_files.find_data_dir(args.root, download=False)
    except FileNotFoundError as e:
        print(f"Omniglot not found, skipping its benchmarks: {e}")
        data_dir = None
    if data_dir is not None:
        if args.cold:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                _, _, info = omniglot_files.load_characters(data_dir, 28, cache_dir=tmp)
                build = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, _, info2 = omniglot_files.load_characters(data_dir, 28, cache_dir=tmp)
                load = time.perf_counter() - t0
            result["cache"].update(build_s=round(build, 2), build_source=info["source"],
                                   read_s=round(load, 3), read_source=info2["source"])
            print(f"Omniglot cache: built in {build:.1f} s (decode of 32,460 PNGs), read back in {load:.3f} s")
        Omniglot(data_dir, cache_dir=args.cache_dir)  # make sure the cache is warm
        t0 = time.perf_counter()
        omni = Omniglot(data_dir, split="train", cache_dir=args.cache_dir)
        ctor = time.perf_counter() - t0
        result["cache"].update(warm_construct_train_s=round(ctor, 3), warm_source=omni.load_info["source"],
                               cache_path=omni.load_info["cache_path"])
        print(f"Omniglot(split='train') from a warm cache: {ctor:.2f} s ({omni.load_info['source']}: "
              f"{omni.load_info['cache_path']}); {omni.num_classes} classes")

    # ---- throughput ----------------------------------------------------------------------------
    cases = []
    if omni is not None:
        for ways, shots, queries, batches in ((5, 1, 15, (8, 32, 128)), (5, 5, 15, (32,)), (20, 1, 15, (32,)), (20, 5, 15, (32,))):
            ds = Omniglot(data_dir, split="train", ways=ways, shots=shots, queries=queries, cache_dir=args.cache_dir)
            for t in batches:
                cases.append((f"omniglot {ways}w{shots}s{queries}q", t, lambda ds=ds, t=t: ds.sample(t)))
        ev = Omniglot(data_dir, split="test", cache_dir=args.cache_dir)
        cases.append(("omniglot eval episodes(600, batch=32)", 600,
                      lambda ev=ev: [None for _ in ev.episodes(600, batch=32, seed=0)]))
    sin = Sinusoid(shots=10, queries=10)
    cases.append(("sinusoid 10-shot 10q", 25, lambda: sin.sample(25)))
    synth = torch.randint(0, 256, (64, 100, 3, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    mini = TaskSampler(synth, 5, 1, 15, scale=1 / (255 * std), shift=-mean / std, name="synthetic mini-ImageNet")
    cases.append(("mini-ImageNet-shaped 5w1s15q (synthetic)", 4, lambda: mini.sample(4)))

    print(f"\n{'case':42s} {'T':>5s} {'threads':>7s} {'tasks/s':>10s} {'tasks/cpu-s':>11s} {'ms/call':>9s}")
    for n in threads:
        torch.set_num_threads(n)
        for name, t, fn in cases:
            rate, cpu_rate, ms, calls = throughput(fn, t, args.seconds)
            rows.append({"case": name, "tasks_per_call": t, "threads": n, "tasks_per_s": round(rate, 1),
                         "tasks_per_cpu_s": round(cpu_rate, 1), "ms_per_call_median": round(ms, 3), "calls": calls})
            print(f"{name:42s} {t:5d} {n:7d} {rate:10.0f} {cpu_rate:11.0f} {ms:9.3f}")
    torch.set_num_threads(default_threads)

    result["machine"]["loadavg_end"] = loadavg()
    key = [r for r in rows if r["case"] == "omniglot 5w1s15q" and r["tasks_per_call"] == 32]
    if key:
        best = max(key, key=lambda r: r["tasks_per_s"])
        verdict = "meets" if best["tasks_per_s"] >= TARGET else "BELOW"
        result["verdict"] = {"case": "omniglot 5w1s15q, T=32", "best_tasks_per_s": best["tasks_per_s"],
                             "threads": best["threads"], "tasks_per_cpu_s": best["tasks_per_cpu_s"],
                             "meets_target": best["tasks_per_s"] >= TARGET}
        print(f"\nOmniglot 5-way 1-shot 15-query, T=32: {best['tasks_per_s']:.0f} tasks/s with {best['threads']} "
              f"thread(s) ({best['tasks_per_cpu_s']:.0f} per CPU-second): {verdict} the {TARGET} tasks/s target")
    print(f"load average: start {result['machine']['loadavg_start']}, end {result['machine']['loadavg_end']} "
          f"({os.cpu_count()} CPUs)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
