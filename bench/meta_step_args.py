"""The options of the meta-step benchmark (bench/bench_meta_step.py), in a module that imports no torch.

``python bench/bench_meta_step.py`` and ``fastmaml bench`` (fastmaml/bench_command.py) both take them
from here, so ``fastmaml bench --help`` shows the real options and refuses a bad one at once.
Only the default output folder differs: the script writes to ``bench/results`` (the project's own
measurements), ``fastmaml bench`` to the current folder.
"""

from __future__ import annotations

import argparse
from typing import List

#: bench_meta_step.WORKLOADS' names (the script checks that they agree)
WORKLOAD_NAMES = ("omniglot-5w1s", "omniglot-5w1s-train", "omniglot-20w5s", "sinusoid", "omniglot-mlp-5w1s")
DEFAULT_IMPLS = "engine,reference,torch_func,torch_func_bnfix,learn2learn,higher,torchopt"

DESCRIPTION = """\
Time and peak memory of one MAML meta-step (second order unless --first-order): fastmaml's engine
against its per-task reference, torch.func (vmap) and, where installed, learn2learn, higher and
TorchOpt, on the same model, tasks and inner learning rate. Every configuration runs in a fresh
process; every implementation's meta-gradient is checked against the reference computed in
float64 before its time is reported (same_gradient, with the relative error, its tolerance and,
for a mismatch, the reason when it is known).

Workloads: omniglot-5w1s (the paper's conv4 on 28x28 inputs, 5-way 1-shot, 15 queries per class),
omniglot-5w1s-train (1 query per class, the omniglot-5w1s config's training batch),
omniglot-20w5s, sinusoid (the 1-40-40-1 MLP, 10-shot), omniglot-mlp-5w1s (the paper's MLP
without convolutions). Inputs are random: speed does not depend on pixel values.

The default (omniglot-5w1s, 32 tasks, K = 1 and 5, seven implementations) takes roughly 5 to 15
minutes on a 2-core CPU (estimated from the per-step times in docs/benchmarks.md); `--workloads
sinusoid --tasks 4 --steps 1 --impls engine,reference` takes seconds. Results: a table on
the screen and a JSON file (the machine, the arguments and every row) whose path is printed.
learn2learn, higher and TorchOpt are not fastmaml dependencies: bench/setup_bench_env.sh installs
them in a separate venv; missing ones are reported and skipped."""


def add_arguments(ap: argparse.ArgumentParser, out_help: str) -> None:
    """The benchmark's options on ``ap``; ``out_help``: what ``--out`` defaults to."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--workloads", nargs="+", default=["omniglot-5w1s"], choices=WORKLOAD_NAMES, metavar="W",
                    help=f"one or more of {', '.join(WORKLOAD_NAMES)} (default: omniglot-5w1s)")
    ap.add_argument("--tasks", nargs="+", type=int, default=[32], metavar="T", help="tasks per meta-batch (default 32)")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5], metavar="K", help="inner steps (default: 1 5)")
    ap.add_argument("--impls", default=DEFAULT_IMPLS,
                    help="comma-separated implementations (default: %(default)s; also engine-fused, engine-loop, "
                         "engine-vmap, engine-recompute, engine-kernels-torch, ...); unavailable ones are reported "
                         "and skipped")
    ap.add_argument("--first-order", action="store_true", help="first-order MAML (default: second order)")
    ap.add_argument("--oracle", choices=("float64", "first"), default="float64",
                    help="what every meta-gradient is checked against: the reference computed in float64 "
                         "(one untimed step per configuration), or the first implementation listed")
    ap.add_argument("--tf32", action="store_true",
                    help="let CUDA convolutions and matmuls use TF32 (PyTorch's default for cuDNN); off: exact float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed meta-steps per configuration (median; default 3)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps after the first (checked) one")
    ap.add_argument("--sweep", action="store_true",
                    help="the sweep grid: every workload, T in 4 16 32 64, K in 1 5 10 20 (overrides those options)")
    ap.add_argument("--group", action="store_true",
                    help="CUDA only: one process per workload and implementation for all its (T, K), the peak "
                         "memory reset between them (saves a process and CUDA start-up per configuration)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (default 900)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds for the whole run (0: no limit); configurations left when it is spent are "
                         "recorded as not run, and the run ends cleanly with what it measured")
    ap.add_argument("--name", default="meta_step", help="JSON file name stem: NAME_<device>.json (default meta_step)")
    ap.add_argument("--out", default=None, metavar="DIR", help=f"folder for the JSON ({out_help})")


_VALUES = ("device", "impls", "oracle", "repeats", "warmup", "threads", "timeout", "budget", "name", "out")
_LISTS = ("workloads", "tasks", "steps")
_FLAGS = ("first_order", "tf32", "sweep", "group")


def to_argv(args: argparse.Namespace) -> List[str]:
    """The command line that parses back to ``args`` (how ``fastmaml bench`` hands its checked
    arguments to the script)."""
    out: List[str] = []
    for name in _VALUES:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    for name in _LISTS:
        out += [f"--{name}", *map(str, getattr(args, name))]
    out += [f"--{name.replace('_', '-')}" for name in _FLAGS if getattr(args, name)]
    return out
