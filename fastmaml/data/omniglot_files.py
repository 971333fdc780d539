"""Reading the Omniglot distribution into one uint8 array, with a decode-once cache.

Sources: the official ``images_background.zip`` and ``images_evaluation.zip`` (members
``images_background/<Alphabet>/characterNN/NNNN_DD.png``) or the folders they extract to. Per part,
an extracted folder is preferred over the zip when both are present.

``load_characters`` returns all characters of both parts, sorted by ``Alphabet/characterNN``,
as uint8 ``[num_characters, 20, H, W]`` (stroke = 1, background = 0; drawings sorted by file name)
plus the character names. The first call decodes the 32,460 PNGs (``decode.decode_strokes``) and
writes a cache file ``omniglot-<H>x<W>.fmcache`` (``omniglot-<H>x<W>-nearest.fmcache`` for
``resize="nearest"``) in the cache folder (``cache_dir``, else
``$FASTMAML_CACHE/omniglot``, default ``~/.cache/fastmaml/omniglot``; never the data folder, see
``paths.cache_locations``). The cache is keyed on the sources (each
zip's size and mtime; for an extracted folder, every file's path, size and mtime), the image size
and the preprocessing (resize method and version); it carries a SHA-256 of its payload. A stale or corrupt cache is
rebuilt (and rewritten atomically). A hit reads no PNG and does not parse the zips.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import cache, decode, paths

PARTS = ("images_background", "images_evaluation")
DRAWINGS = 20
PREPROCESS_VERSION = "lanczos-threshold128-v1"  # the cache key of resize="lanczos", as before "nearest" existed
PREPROCESS_VERSIONS = {"lanczos": PREPROCESS_VERSION, "nearest": "pil-nearest-threshold128-v1"}

HOW_TO_GET = (
    "pass download=True to fetch the official zips, or set FASTMAML_DATA to a folder that "
    "contains omniglot/images_background.zip and omniglot/images_evaluation.zip"
)


def part_source(data_dir: Path, part: str) -> Optional[Path]:
    """The extracted folder or the zip of ``part`` in ``data_dir``, or None."""
    folder = data_dir / part
    if folder.is_dir():
        return folder
    z = data_dir / f"{part}.zip"
    if z.is_file():
        return z
    return None


def has_data(data_dir: Path) -> bool:
    return all(part_source(data_dir, p) is not None for p in PARTS)


def find_data_dir(root, download: bool) -> Path:
    """Resolve the Omniglot folder (see ``paths``); download into it when asked and missing."""
    candidates = paths.candidate_dirs("omniglot", root)
    for c in candidates:
        if has_data(c):
            return c
    if download:
        from .download import download_omniglot  # late: tests patch its tables

        target = paths.download_dir("omniglot", root)
        missing = [p for p in PARTS if part_source(target, p) is None]
        download_omniglot(target, names=[f"{p}.zip" for p in missing])
        return target
    partial = [c for c in candidates if c.is_dir() and any(part_source(c, p) is not None for p in PARTS)]
    detail = ""
    if partial:
        lacking = [f"{p}.zip" for p in PARTS if part_source(partial[0], p) is None]
        detail = f"{partial[0]} lacks {' and '.join(lacking)}"
    if root is None and paths.env_data_dir() is None:  # why only the default folder was looked in
        detail = "; ".join(filter(None, [detail, "$FASTMAML_DATA is unset"]))
    raise paths.DataNotFound(
        "Omniglot", "images_background.zip and images_evaluation.zip (or their extracted folders)",
        candidates, detail, "pass root=DIR, set FASTMAML_DATA=DIR (the folder holding omniglot/), or download=True")


def source_stamp(src: Path) -> Dict[str, object]:
    """What the cache key records of a source: a zip's size and mtime; for an extracted folder, a
    hash over every file's relative path, size and mtime."""
    if src.is_file():
        st = src.stat()
        return {"kind": "zip", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        for fn in sorted(filenames):
            st = os.stat(os.path.join(dirpath, fn))
            h.update(f"{rel}/{fn}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return {"kind": "folder", "files": count, "sha256": h.hexdigest()}


def _bad_zip(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path}: not a valid Omniglot zip ({err}). Delete it and re-fetch: {HOW_TO_GET}."
    )


class _Listing:
    """Characters of one part: name -> sorted member names (zip) or file paths (folder)."""

    def __init__(self, source: Path, part: str):
        self.source = source
        self.part = part
        self.is_zip = source.is_file()
        chars: Dict[str, List[str]] = defaultdict(list)
        if self.is_zip:
            try:
                with zipfile.ZipFile(source) as zf:
                    infos = zf.infolist()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise _bad_zip(source, e) from None
            for info in sorted(infos, key=lambda i: i.filename):
                parts = info.filename.split("/")
                if len(parts) == 4 and parts[0] == part and parts[3].endswith(".png"):
                    chars[f"{parts[1]}/{parts[2]}"].append(info.filename)
        else:
            for dirpath, dirnames, filenames in os.walk(source):
                dirnames.sort()
                rel = Path(dirpath).relative_to(source).parts
                if len(rel) != 2:
                    continue
                for fn in sorted(filenames):
                    if fn.endswith(".png"):
                        chars[f"{rel[0]}/{rel[1]}"].append(os.path.join(dirpath, fn))
        if not chars:
            what = f"members {part}/<Alphabet>/characterNN/*.png" if self.is_zip else "<Alphabet>/characterNN/*.png"
            raise ValueError(f"{source}: expected Omniglot {what}, found none. {HOW_TO_GET}.")
        for name, files in chars.items():
            files.sort()
            if len(files) != DRAWINGS:
                raise ValueError(
                    f"{source}: expected {DRAWINGS} drawings for {name}, found {len(files)}. {HOW_TO_GET}."
                )
        self.chars = dict(chars)

    def read_items(self, names: List[str]) -> list:
        """Encoded PNG bytes (zip) or paths (folder), character-major, drawing-minor."""
        if not self.is_zip:
            return [f for n in names for f in self.chars[n]]
        out = []
        try:
            with zipfile.ZipFile(self.source) as zf:
                for n in names:
                    for member in self.chars[n]:
                        out.append(zf.read(member))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise _bad_zip(self.source, e) from None
        return out


def image_hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    else:
        try:
            hw = tuple(int(s) for s in image_size)
        except TypeError:
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return hw


def load_characters(
    data_dir: Path,
    image_size=28,
    cache_dir=None,
    num_workers: Optional[int] = None,
    resize: str = "lanczos",
) -> Tuple[np.ndarray, List[str], Dict[str, object]]:
    """All Omniglot characters: (uint8 ``[n, 20, H, W]``, names, info); ``resize``: see ``decode``.

    ``info``: ``source`` ("cache" or "decoded"), ``cache_path``, ``cache_reason`` (why the cache
    was not used, if it was not), ``seconds``.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    h, w = image_hw(image_size)
    decode.check_resize(resize)
    sources = []
    for part in PARTS:
        src = part_source(data_dir, part)
        if src is None:
            raise FileNotFoundError(
                f"root: expected {data_dir / (part + '.zip')} (or the folder {data_dir / part}), "
                f"not found. To get it: {HOW_TO_GET}."
            )
        sources.append((part, src))
    key = {
        "dataset": "omniglot",
        "format": 1,
        "preprocess": PREPROCESS_VERSIONS[resize],
        "size": [h, w],
        "sources": {part: source_stamp(src) for part, src in sources},
    }
    fname = f"omniglot-{h}x{w}.fmcache" if resize == "lanczos" else f"omniglot-{h}x{w}-{resize}.fmcache"
    folders = paths.cache_locations(data_dir, "omniglot", cache_dir)
    reasons = []
    for folder in folders:
        res = cache.load_array(folder / fname, key)
        if res.array is not None:
            names = list(res.meta.get("names", []))
            if len(names) == res.array.shape[0]:
                info = {"source": "cache", "cache_path": str(folder / fname), "cache_reason": "hit",
                        "seconds": time.perf_counter() - t0}
                return res.array, names, info
            reasons.append(f"{folder / fname}: corrupt: names and images disagree")
        else:
            reasons.append(f"{folder / fname}: {res.reason}")

    listings = [_Listing(src, part) for part, src in sources]
    dup = set(listings[0].chars) & set(listings[1].chars)
    if dup:
        raise ValueError(f"{data_dir}: characters present in both parts: {sorted(dup)[:3]}...")
    names, items, where = [], [], []
    for l in listings:
        ns = sorted(l.chars)
        names.extend(ns)
        items.extend(l.read_items(ns))
        where.extend(f"{l.source}:{m}" for n in ns for m in l.chars[n])
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    arr = decode.decode_all(functools.partial(decode.decode_strokes, resize=resize), items, (h, w), num_workers=num_workers,
                            describe=lambda i: where[i])
    arr = arr.reshape(len(names), DRAWINGS, h, w)[order]
    names = [names[i] for i in order]
    try:
        out_dir = paths.first_writable(folders)
        cache.save_array(out_dir / fname, arr, key, {"names": names})
        cache_path = str(out_dir / fname)
    except OSError as e:  # no writable place: work without a cache
        warnings.warn(f"Omniglot: could not write the decoded-image cache ({e}); the next load decodes again")
        cache_path = None
    info = {"source": "decoded", "cache_path": cache_path, "cache_reason": "; ".join(reasons),
            "seconds": time.perf_counter() - t0}
    return np.ascontiguousarray(arr), names, info
