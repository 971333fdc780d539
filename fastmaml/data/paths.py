"""Where datasets and caches live.

Data folders are looked up, in order:

1. the ``root`` argument: the dataset's own folder (``.../omniglot``) or a folder that contains it;
2. ``$FASTMAML_DATA/<dataset>``: ``FASTMAML_DATA`` names a folder that CONTAINS ``omniglot/``,
   ``miniimagenet/``, ... (e.g. ``FASTMAML_DATA=/work/shared/data``);
3. the default cache folder ``~/.cache/fastmaml/<dataset>`` (``$FASTMAML_CACHE`` or
   ``$XDG_CACHE_HOME/fastmaml`` when set).

Decoded-image caches are never written into a data folder: they go to ``cache_dir`` when given,
else to ``$FASTMAML_CACHE/<dataset>`` (default ``~/.cache/fastmaml/<dataset>``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import List, Optional, Union

ENV_DATA = "FASTMAML_DATA"
ENV_CACHE = "FASTMAML_CACHE"


class DataNotFound(FileNotFoundError):
    """A dataset's files were not found: ``dataset``, what was ``expected``, the ``places`` looked in
    and, when one of them holds part of it, a short ``detail``. ``str()`` is the Python API's message;
    the command line words its own from the attributes."""

    def __init__(self, dataset: str, expected: str, places: List[Path], detail: str = "", fix: str = ""):
        self.dataset, self.expected, self.places, self.detail = dataset, expected, [str(p) for p in places], detail
        where = " or ".join(self.places)
        text = f"root: {dataset} not found: expected {expected} in {where}"
        if detail:
            text += f" ({detail})"
        if fix:
            text += f"; {fix}"
        super().__init__(text)

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$FASTMAML_CACHE``, else ``$XDG_CACHE_HOME/fastmaml``, else ``~/.cache/fastmaml``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "fastmaml"
    return Path.home() / ".cache" / "fastmaml"


def env_data_dir() -> Optional[Path]:
    """``$FASTMAML_DATA`` as a path, or None when unset or empty."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else None


def is_writable_dir(path: PathLike) -> bool:
    """True when ``path`` is a folder we may create files in.

    Besides ``os.access``, a folder whose mode has no write bit at all (``r-xr-xr-x``) counts as
    read-only even for root, who would otherwise bypass the bits: a shared dataset folder made
    read-only by its owner is never written into.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not (st.st_mode & 0o222):
        return False
    return os.access(p, os.W_OK | os.X_OK)


def candidate_dirs(dataset: str, root: Optional[PathLike]) -> List[Path]:
    """The folders that may hold ``dataset``, in lookup order (see the module docstring)."""
    if root is not None:
        r = Path(root).expanduser()
        return [r] if r.name == dataset else [r, r / dataset]
    out = []
    env = env_data_dir()
    if env is not None:
        out.append(env / dataset)
    out.append(default_cache_dir() / dataset)
    return out


def download_dir(dataset: str, root: Optional[PathLike]) -> Path:
    """Where ``download=True`` puts ``dataset``: ``root`` itself when it is named after the
    dataset, else ``root/<dataset>``; without ``root``, ``$FASTMAML_DATA/<dataset>`` when that
    folder (or its parent) is writable, else the default cache folder."""
    if root is not None:
        r = Path(root).expanduser()
        return r if r.name == dataset else r / dataset
    env = env_data_dir()
    if env is not None:
        target = env / dataset
        probe = target if target.exists() else env
        if is_writable_dir(probe):
            return target
    return default_cache_dir() / dataset


def cache_locations(data_dir: Path, dataset: str, cache_dir: Optional[PathLike]) -> List[Path]:
    """The folder for a dataset's decoded-array cache: ``cache_dir`` when given, else the default
    cache folder ``default_cache_dir() / dataset``. Never the data folder itself: a user's data
    folder is only read (``data_dir`` is accepted for the callers' sake and not used)."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    return [default_cache_dir() / dataset]


def first_writable(folders: List[Path]) -> Path:
    """The first folder of ``folders`` that is writable or can be created (the last one is created
    if needed); raises PermissionError naming them all when none is."""
    for f in folders:
        if is_writable_dir(f):
            return f
        if not f.exists():
            try:
                f.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if is_writable_dir(f):
                return f
    raise PermissionError(
        "cache_dir: no writable folder for the cache; tried " + ", ".join(map(str, folders))
        + " (pass cache_dir=... or set FASTMAML_CACHE to a writable folder)"
    )
