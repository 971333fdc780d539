"""The run folder of ``fastmaml train`` (default ``runs/<config>``): its files, its JSON, its metrics
lines, and the comparison of a folder's config with a requested one.

The files (``RUN_FILES``) are described in :mod:`fastmaml.app.train`. ``eval`` and ``plot`` read the
same folder through these functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

# fastmaml.app.checkpoint (torch) is imported where used: `fastmaml eval --help` imports this module
from .. import fsutil
from . import configs, run_info
from .configs import Config
from .errors import UserError

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RESUMABLE", "default_run_dir", "read_json", "write_json", "holds_run",
           "describe_differences", "read_metrics", "truncate_metrics", "check_writable"]

# the files of a run folder; checkpoint.FILENAME and checkpoint.PREV_FILENAME spelled out (fastmaml.app.checkpoint
# imports torch; tests/test_cli_startup.py checks that they agree)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "eval.json", "checkpoint.prev.pt", run_info.FILENAME)
RUN_FOLDERS = ("plots",)


def default_run_dir(config: Config) -> Path:
    return Path("runs") / config["config"]


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    from . import checkpoint as ckpt_mod

    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    ckpt_mod.atomic_write_bytes(path, lambda f: f.write(text.encode()))


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / f).exists() for f in RUN_FILES[:3])


def describe_differences(diffs, old_label: str, new_label: str) -> str:
    return "; ".join(f"{k}: {configs.format_value(a)} ({old_label}) vs {configs.format_value(b)} ({new_label})"
                     for k, a, b in diffs)


RESUMABLE = tuple(k for k, spec in configs.KEYS.items() if spec.resumable)


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The well-formed lines of a metrics file (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("iter"), int):
                    out.append(obj)
    except FileNotFoundError:
        pass
    return out


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep only the metric lines of iterations <= ``iteration``, less the partial lines a stop wrote
    (the resumed run goes on with their window), atomically."""
    keep = [m for m in read_metrics(path) if m["iter"] <= iteration and not m.get("partial")]
    text = "".join(json.dumps(m) + "\n" for m in keep)
    from . import checkpoint as ckpt_mod

    ckpt_mod.atomic_write_bytes(path, lambda f: f.write(text.encode()))


def check_writable(folder: Path, what: str, fix: str) -> None:
    """A one-line :class:`UserError` when files cannot be created in ``folder`` (checked for real,
    before any work is done)."""
    problem = fsutil.writable_problem(folder)
    if problem is not None:
        raise UserError(f"cannot write {what} to {folder}: {problem}; {fix}")
