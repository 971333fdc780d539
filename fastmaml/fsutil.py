"""Crash-safe file writes: write a temp file in the target folder, fsync, rename, fsync the folder.

A reader never sees a half-written file under the final name: until ``os.replace`` the bytes live
under a hidden ``.<name>.<random>.part`` name that no loader looks at.
"""

from __future__ import annotations

import contextlib
import errno
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
def atomic_write(dest: Path, suffix: str = PART_SUFFIX, make_parent: bool = True) -> Iterator[BinaryIO]:
    """Open a temp file beside ``dest`` for writing; on a clean exit it is fsynced and renamed to
    ``dest``; on any exception (including KeyboardInterrupt) it is deleted and ``dest`` is untouched.
    ``make_parent``: create ``dest``'s folder when missing (else a missing folder is an error: a
    checkpoint must not recreate a run folder deleted meanwhile). A failed rename (``dest`` is a
    folder, ...) is reported under ``dest``'s name, not the temporary file's."""
    dest = Path(dest)
    if make_parent:
        dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(dest)) from None
    try:
        with contextlib.suppress(OSError, AttributeError):  # mkstemp makes 0600; use the usual 0666 & ~umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(dest)) from None
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


# -- writability and the run folder's lock -----------------------------------------------------------

def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_problem(folder: Path) -> "str | None":
    """Why files cannot be created in ``folder`` (or in its nearest existing ancestor, where it is to be
    created), or None when they can. Tried for real: a temporary file is created and removed, which
    also catches read-only mounts and ACLs that permission bits do not show."""
    target = nearest_existing(folder)
    if not target.is_dir():
        return f"{target} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastmaml-write-test.", suffix=".tmp", dir=target)
    except OSError as e:
        return f"{target} is not writable ({e.strerror or e})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


class LockHeld(Exception):
    """Another live process holds the lock; ``pid`` is the owner's (None if unknown)."""

    def __init__(self, path: Path, pid: "int | None"):
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An advisory lock file holding its owner's pid (``<folder>/train.lock``).

    Taken with ``flock`` where the OS has it (released by the kernel when the owner dies, however it
    dies) and the owner's pid written into the file; without ``flock`` a lock file whose pid is not a
    live process is stale and taken over. :meth:`acquire` raises :class:`LockHeld` when a live
    process holds it; :meth:`release` removes the file."""

    NAME = "train.lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._fd: "int | None" = None

    def _read_pid(self) -> "int | None":
        try:
            text = self.path.read_text().strip().split()
            return int(text[0]) if text else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            fcntl = None
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = False
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        locked = True
                    except OSError as e:
                        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                            raise LockHeld(self.path, self._read_pid()) from None
                        # no flock on this file system (some network mounts): the pid check below
                if locked:
                    # the file may have been removed (released) between open and flock: retry then
                    try:
                        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same = False
                    if not same:
                        os.close(fd)
                        continue
                else:
                    pid = self._read_pid()
                    if pid is not None and pid != os.getpid() and pid_alive(pid):
                        raise LockHeld(self.path, pid)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise LockHeld(self.path, self._read_pid())  # pragma: no cover

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self._read_pid() == os.getpid():
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
