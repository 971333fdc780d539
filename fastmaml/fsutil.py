"""Crash-safe file writes: write a temp file in the target folder, fsync, rename, fsync the folder.

A reader never sees a half-written file under the final name: until ``os.replace`` the bytes live
under a hidden ``.<name>.<random>.part`` name that no loader looks at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

PART_SUFFIX = ".part"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(dest: Path, suffix: str = PART_SUFFIX) -> Iterator[BinaryIO]:
    """Open a temp file beside ``dest`` for writing; on a clean exit it is fsynced and renamed to
    ``dest``; on any exception (including KeyboardInterrupt) it is deleted and ``dest`` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    try:
        with contextlib.suppress(OSError, AttributeError):  # mkstemp makes 0600; use the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


def remove_stale_parts(folder: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Delete leftovers ``.<name>.*.part`` of writers that were killed (older than ``older_than_s``,
    so a concurrent writer's live temp file is left alone). Loaders ignore them either way."""
    now = time.time()
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(f".{name}.*{PART_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
