"""Is the run folder that training writes into still there, and still the same one?

Training keeps ``metrics.jsonl`` open and writes ``checkpoint.pt`` now and then. If the run folder is
deleted (or moved, or replaced) meanwhile, the open file takes the metric lines into a deleted file
and the next checkpoint would recreate the folder holding a checkpoint alone: a half run whose
config and metrics are gone, reported as a success. :class:`RunFolderGuard` remembers the folder's
and the metrics file's identity (device and inode) when training starts; :meth:`problem`, called
before each metrics line and each checkpoint (a few ``stat`` calls), says what changed, so that
training stops with an error instead of writing anything more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["RunFolderGuard"]


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


class RunFolderGuard:
    """``run_dir`` and its ``metrics`` file (open as ``metrics_fd``) as they are now; ``config`` must
    stay a file too."""

    def __init__(self, run_dir: Path, metrics: Path, metrics_fd: int, config: Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics = Path(metrics)
        self.config = Path(config)
        self._folder = _identity(os.stat(self.run_dir))
        self._metrics = _identity(os.fstat(metrics_fd))

    def problem(self) -> Optional[str]:
        """What happened to the run folder since training started, or None when nothing did."""
        try:
            folder = _identity(os.stat(self.run_dir))
        except FileNotFoundError:
            return f"the run folder {self.run_dir} was deleted or moved"
        if folder != self._folder:
            return f"the run folder {self.run_dir} was replaced by another folder (deleted and made again?)"
        try:
            metrics = _identity(os.stat(self.metrics))
        except FileNotFoundError:
            return f"{self.metrics} was deleted"
        if metrics != self._metrics:
            return f"{self.metrics} was replaced by another file"
        if not self.config.is_file():
            return f"{self.config} was deleted"
        return None

    def folder_gone(self) -> bool:
        """Whether the folder itself is gone or another one (not just a file in it)."""
        try:
            return _identity(os.stat(self.run_dir)) != self._folder
        except FileNotFoundError:
            return True
