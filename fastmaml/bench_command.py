"""``fastmaml bench``: the meta-step benchmark (``bench/bench_meta_step.py`` of a source checkout).

The benchmark scripts and the comparison implementations live in the repository's ``bench/`` folder,
not in the installed package; this command finds them beside the package (an editable install or a
checkout on ``PYTHONPATH``) and runs the meta-step benchmark with the given arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .configs import UserError

COMMAND_HELP = "time and measure the memory of a meta-step: the engine vs the reference, torch.func, learn2learn, ..."
COMMAND_DESCRIPTION = (COMMAND_HELP + ". Arguments after `bench` go to bench/bench_meta_step.py "
                       "(`fastmaml bench -- --help` lists them).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench/bench_meta_step.py")


def script_path() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "bench", "bench_meta_step.py")


def run(argv) -> int:
    script = script_path()
    if not os.path.isfile(script):
        raise UserError(f"the benchmark scripts are not installed with the package: {script} is missing; "
                        "run `fastmaml bench` from an editable install of a fastmaml checkout (pip install -e .)")
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return subprocess.call([sys.executable, script, *argv])


def main(args) -> int:
    return run(args.args)
