"""Evaluate trained Omniglot runs under the two query protocols, side by side, into one JSON file.

BatchNorm with batch statistics makes a query's prediction depend on the other images of its forward
pass (docs/reproduction.md, "Query set sizes, and BatchNorm at test time"). For every run folder given,
this runs ``fastmaml eval`` on the same 600 fixed test episodes (the config's ``eval_seed``) with

* ``one_pass``: all ``eval_queries`` (15) queries per class in one forward pass
  (``--queries-per-pass all``), and
* ``training_passes``: passes of the config's ``queries`` per class (``--queries-per-pass K``, the
  default of ``fastmaml eval``): the batch statistics the run was meta-trained with, and what the
  MAML code's test does,

for each ``--steps`` asked and each ``--task-rotations`` (Omniglot's test episodes: ``class``, the
default, or ``character``, the MAML code's test tasks of distinct characters), on a copy of the run
folder (the run's own ``eval.json`` is left as it is).

    python bench/eval_protocols.py RUN_DIR [RUN_DIR ...] --out FILE.json --what "..." [--steps 10 3]
                                   [--task-rotations class character]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def eval_run(run: Path, steps: int, per_pass, data: str, threads: int, task_rotations: str = "class") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        copy.mkdir()
        for f in ("checkpoint.pt", "config.json", "run.json"):
            if (run / f).exists():
                shutil.copy2(run / f, copy / f)
        cmd = [sys.executable, "-m", "fastmaml", "eval", str(copy), "--data", data, "--threads", str(threads),
               "--steps", str(steps), "--quiet"]
        cmd += ["--queries-per-pass", str(per_pass)]
        if task_rotations != "class":
            cmd += ["--task-rotations", task_rotations]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out = json.loads((copy / "eval.json").read_text())
    out.pop("checkpoint", None)
    out.pop("data", None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--what", required=True, help="what the runs compare (goes into the JSON)")
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.add_argument("--task-rotations", nargs="+", choices=("class", "character"), default=["class"])
    p.add_argument("--data", default=os.environ.get("FASTMAML_DATA", "../shared/data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="machine load while it ran, etc.")
    a = p.parse_args(argv)
    if a.out.suffix != ".json":
        p.error(f"--out: expected a .json file, got {a.out}")
    info = machine("cpu")
    info["torch_threads"] = a.threads  # the evaluations run in subprocesses with --threads, not in this one
    result = {"what": a.what, "machine": info, "note": a.note,
              "command": "python bench/eval_protocols.py " + " ".join(map(str, a.runs)) + " --steps "
              + " ".join(map(str, a.steps)) + " --task-rotations " + " ".join(a.task_rotations)
              + f" --threads {a.threads}", "runs": {}}
    for run in a.runs:
        config = json.loads((run / "config.json").read_text())
        entry = {"config": config, "evals": []}
        for rotations in a.task_rotations:
            for steps in a.steps:
                for name, per_pass in (("one_pass", "all"), ("training_passes", config["queries"])):
                    r = eval_run(run, steps, per_pass, a.data, a.threads, rotations)
                    r["protocol"] = name
                    entry["evals"].append(r)
                    print(f"{run.name:40s} {r['iteration']:>6d} it  {steps:>2d} steps  {rotations:9s} {name:16s} "
                          f"{100 * r['accuracy']:6.2f} ± {100 * r['accuracy_ci95']:.2f} %")
        result["runs"][run.name] = entry
    write_json(a.out.stem, result, str(a.out.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
