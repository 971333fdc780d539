"""The four published MAML examples, original library vs fastmaml.compat with only the import swapped.

Run where the libraries are installed (python tests/install_compat_libs.py, or the bench venv):

    python bench/bench_porting.py --threads 1 [--rounds 5] [--tasks 8] [--only torchopt]

Each example is its pattern script from tests/compat_examples.py (the published calls, on random data of
the published shapes, float32 as published), built twice from the same seed: once with the library
(``import learn2learn as l2l``, ``import higher``, ``import torchopt``) and once with the compat module
of the same name. Per round, one meta-step (the example's whole training iteration: the task loop,
backward, the outer Adam step; learn2learn's Omniglot example includes its validation clones) of each,
side by side, after one warm-up step each; the median over ``--rounds`` rounds (more for cheap
examples, until the original's steps add up to ``--min-time`` seconds) and the ratio. Also the
relative error between the two versions' meta-gradients of the first step (the tests check float64
equality to 1e-12; here it shows float32 agreement on the timed workload). Tasks per meta-step:
``--tasks`` (default 8; the published scripts use 16 (sine) and 32). A table on stdout and JSON with the
machine's details in bench/results/porting_cpu.json (``--only``: porting_cpu_<name>.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import compat_examples as E  # noqa: E402
from common import machine, table, write_json  # noqa: E402
from compat_libs import VERSIONS, load  # noqa: E402
from fastmaml.compat import higher as fhigher  # noqa: E402
from fastmaml.compat import learn2learn as fl2l  # noqa: E402
from fastmaml.compat import torchopt as ftorchopt  # noqa: E402

COMPAT = {"learn2learn": fl2l, "higher": fhigher, "torchopt": ftorchopt}
# name: (example class, extra settings)
WORKLOADS = {
    "learn2learn maml_sine.py": (E.L2LSine, {}),
    "learn2learn vision/maml_omniglot.py (OmniglotFC)": (E.L2LOmniglot, {"model": "fc"}),
    "learn2learn vision/maml_omniglot.py (OmniglotCNN)": (E.L2LOmniglot, {"model": "cnn"}),
    "higher maml-omniglot.py": (E.HigherOmniglot, {}),
    "TorchOpt few-shot/maml_omniglot.py": (E.TorchOptOmniglot, {}),
}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="timed meta-steps per version (median), at least")
    p.add_argument("--min-time", type=float, default=5.0,
                   help="more rounds until the original's timed steps add up to this many seconds")
    p.add_argument("--tasks", type=int, default=8, help="tasks per meta-step (published: 16 / 32)")
    p.add_argument("--only", default="", help="run the workloads whose name contains this")
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile (stored in the JSON)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, missing = [], {}
    for name, (cls, extra) in WORKLOADS.items():
        if a.only and a.only not in name:
            continue
        lib, why = load(cls.library)
        if lib is None:
            missing[name] = why
            print(f"{name}: skipped, {why}", flush=True)
            continue
        versions = {"original": cls(lib, dtype=torch.float32, tasks=a.tasks, **extra),
                    "import swap": cls(COMPAT[cls.library], dtype=torch.float32, tasks=a.tasks, **extra)}
        first = {k: v.meta_step() for k, v in versions.items()}   # warm-up, and the gradients compared
        times = {k: [] for k in versions}
        while len(times["original"]) < a.rounds or sum(times["original"]) < a.min_time:   # side by side
            for k, v in versions.items():
                times[k].append(timed(v.meta_step))
        err = E.rel(first["import swap"]["grads"], first["original"]["grads"])
        same = all(torch.equal(x, y) for x, y in zip(first["import swap"]["grads"], first["original"]["grads"]))
        base = statistics.median(times["original"])
        for k in versions:
            med = statistics.median(times[k])
            rows.append({"example": name, "version": k, "tasks": a.tasks, "rounds": len(times[k]), "s/meta-step": med,
                         "min": min(times[k]), "max": max(times[k]), "speed-up": base / med,
                         "grad rel err": None if k == "original" else err,
                         "bitwise": None if k == "original" else same})
        print(table([r for r in rows if r["example"] == name],
                    ["example", "version", "s/meta-step", "min", "max", "speed-up", "grad rel err", "bitwise"]),
              flush=True)
    info = machine("cpu")
    info["note"] = a.note or "no note given"
    libs = {n: VERSIONS[n] for n in COMPAT}
    out = "porting_cpu" if not a.only else "porting_cpu_" + "".join(c if c.isalnum() else "_" for c in a.only)
    path = write_json(out, {"machine": info, "threads": a.threads, "rounds": a.rounds, "min_time_s": a.min_time,
                            "tasks": a.tasks,
                            "dtype": "float32", "libraries": libs, "missing": missing, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
