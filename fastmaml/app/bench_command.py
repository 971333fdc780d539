"""``fastmaml bench``: the meta-step benchmark (``bench/bench_meta_step.py`` of a source checkout).

The benchmark scripts and the comparison implementations live in the repository's ``bench/`` folder,
not in the installed package; this command finds them beside the package (an editable install or a
checkout on ``PYTHONPATH``), checks the arguments (their definitions, ``bench/meta_step_args.py``, are
shared with the script) and runs the script, writing its JSON to ``--out`` (default: the current
folder). It never writes into the package or the source tree by default: run from there, it asks for
``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

from .errors import UserError

COMMAND_HELP = "time and measure the memory of a meta-step: the engine vs the reference, torch.func, learn2learn, ..."

PACKAGE = Path(__file__).resolve().parents[1]  # fastmaml/ (this file is fastmaml/app/bench_command.py)
CHECKOUT = PACKAGE.parent  # the folder holding bench/ in a source checkout


def script_path() -> str:
    return str(CHECKOUT / "bench" / "bench_meta_step.py")


def _args_module() -> ModuleType:
    """bench/meta_step_args.py (argparse only: no torch), or an error saying the scripts are missing."""
    path = CHECKOUT / "bench" / "meta_step_args.py"
    if not path.is_file() or not os.path.isfile(script_path()):
        raise UserError(f"the benchmark scripts are not installed with the package: {path.parent} is missing; "
                        "run `fastmaml bench` from an editable install of a fastmaml checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("fastmaml_bench_meta_step_args", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _description() -> str:
    try:
        return _args_module().DESCRIPTION
    except UserError as e:
        return f"{COMMAND_HELP}. Unavailable here: {e}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = _description()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    try:
        module = _args_module()
    except UserError:
        return  # `fastmaml bench --help` still answers; running it reports the missing scripts
    module.add_arguments(p, out_help="default: the current folder; the package or the source tree only if named "
                                     "here")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_folder(out: Optional[str]) -> Path:
    """Where the JSON goes: ``--out`` as given, else the current folder. Never into the installed
    package; into the source tree only when named with ``--out`` (its bench/results holds the
    project's own measurements), not by default."""
    if out is not None:
        target = Path(out).expanduser().resolve()
        if _inside(target, PACKAGE):
            raise UserError(f"--out {out}: that is inside the fastmaml package ({PACKAGE}); choose a folder of "
                            "your own")
        return target
    here = Path.cwd().resolve()
    if _inside(here, PACKAGE) or _inside(here, CHECKOUT):
        raise UserError(f"fastmaml bench writes its results to the current folder, here the fastmaml source tree "
                        f"({here}); pass --out DIR (e.g. --out ~/fastmaml-bench) or run it from another folder")
    return here


def main(args: argparse.Namespace) -> int:
    module = _args_module()  # the scripts are there (else one error line)
    args.out = str(output_folder(args.out))
    return subprocess.call([sys.executable, script_path(), *module.to_argv(args)])
