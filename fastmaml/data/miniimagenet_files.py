"""Reading mini-ImageNet (Ravi & Larochelle split: 64 / 16 / 20 classes x 600 images) into
uint8 ``[classes, examples, 3, H, W]``.

Two layouts are understood, in a folder (``root``, ``root/miniimagenet`` or
``$FASTMAML_DATA/miniimagenet``):

* pickles: ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with ``image_data`` uint8
  ``[N, 84, 84, 3]`` and ``class_dict`` ``{label: [indices into image_data]}``. They are read with
  a restricted unpickler that only admits numpy arrays and plain containers (no arbitrary code).
* images: ``images/<filename>`` plus ``{train,val,test}.csv`` with the header ``filename,label``.
  The images are decoded once (RGB, LANCZOS-resized when not already at the asked size) and
  cached like Omniglot (``miniimagenet-<split>-<H>x<W>.fmcache`` in the cache
  folder), keyed on the CSV's hash and each image file's size and mtime.

Classes are sorted by label; a class keeps its images in file (or index) order. Every class must
have the same number of images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from . import cache, decode, paths

SPLITS = ("train", "val", "test")
PREPROCESS_VERSION = "rgb-lanczos-v1"
HOW_TO_GET = (
    "mini-imagenet is not downloaded automatically: put images/ + {split}.csv (columns filename,label) "
    "or mini-imagenet-cache-{split}.pkl in root, or in $FASTMAML_DATA/miniimagenet"
)


def pickle_path(d: Path, split: str) -> Path:
    return d / f"mini-imagenet-cache-{split}.pkl"


def csv_path(d: Path, split: str) -> Path:
    return d / f"{split}.csv"


def has_split(d: Path, split: str) -> bool:
    return pickle_path(d, split).is_file() or (csv_path(d, split).is_file() and (d / "images").is_dir())


def find_data_dir(root, split: str) -> Path:
    candidates = paths.candidate_dirs("miniimagenet", root)
    for c in candidates:
        if has_split(c, split):
            return c
    unset = "$FASTMAML_DATA is unset" if root is None and paths.env_data_dir() is None else ""
    raise paths.DataNotFound(
        "mini-ImageNet", f"mini-imagenet-cache-{split}.pkl or images/ + {split}.csv", candidates, unset,
        "pass root=DIR or set FASTMAML_DATA=DIR (the folder holding miniimagenet/); it is not downloaded automatically")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers are allowed")


def _resize_rgb(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """[n, h, w, 3] -> [n, H, W, 3] with LANCZOS (only when the size differs)."""
    h, w = size
    if images.shape[1:3] == (h, w):
        return images
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((w, h), Image.LANCZOS))
    return out


def load_pickle(path: Path, size: Tuple[int, int]) -> Tuple[np.ndarray, List[str]]:
    try:
        with open(path, "rb") as f:
            data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable mini-ImageNet pickle ({e}). {HOW_TO_GET}") from None
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with 'image_data' and 'class_dict', got {got}")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{path}: image_data: expected uint8 [N, H, W, 3], got {got}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: class_dict: expected a non-empty dict {{label: [indices]}}")
    labels = sorted(class_dict, key=str)
    index = [np.asarray(class_dict[k], dtype=np.int64).reshape(-1) for k in labels]
    _check_counts(path, labels, [len(i) for i in index])
    idx = np.stack(index)
    if idx.min() < 0 or idx.max() >= len(images):
        raise ValueError(f"{path}: class_dict: indices out of range [0, {len(images)})")
    picked = _resize_rgb(images[idx.reshape(-1)], size)
    arr = picked.reshape(len(labels), idx.shape[1], size[0], size[1], 3).transpose(0, 1, 4, 2, 3)
    return np.ascontiguousarray(arr), [str(k) for k in labels]


def _check_counts(where, labels, counts) -> None:
    if len(set(counts)) > 1:
        lo = int(np.argmin(counts))
        raise ValueError(
            f"{where}: expected the same number of images in every class, got {counts[lo]} for "
            f"{labels[lo]!r} and {max(counts)} elsewhere"
        )


def _read_csv(path: Path) -> Tuple[Dict[str, List[str]], bytes]:
    raw = path.read_bytes()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        head = rows[0] if rows else []
        raise ValueError(f"{path}: expected a header 'filename,label', got {head}")
    by_label: Dict[str, List[str]] = {}
    for r in rows[1:]:
        if len(r) < 2:
            raise ValueError(f"{path}: expected rows 'filename,label', got {r}")
        by_label.setdefault(r[1].strip(), []).append(r[0].strip())
    if not by_label:
        raise ValueError(f"{path}: no images listed")
    return by_label, raw


def load_folder(d: Path, split: str, size: Tuple[int, int], cache_dir, num_workers) -> Tuple[np.ndarray, List[str], dict]:
    t0 = time.perf_counter()
    cpath = csv_path(d, split)
    by_label, raw = _read_csv(cpath)
    labels = sorted(by_label)
    _check_counts(cpath, labels, [len(by_label[k]) for k in labels])
    files = [d / "images" / f for k in labels for f in by_label[k]]
    h = hashlib.sha256(raw)
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{cpath} lists {f.name}, but {f} does not exist. {HOW_TO_GET}") from None
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = {"dataset": "miniimagenet", "format": 1, "preprocess": PREPROCESS_VERSION, "split": split,
           "size": list(size), "fingerprint": h.hexdigest()}
    fname = f"miniimagenet-{split}-{size[0]}x{size[1]}.fmcache"
    folders = paths.cache_locations(d, "miniimagenet", cache_dir)
    reasons = []
    for folder in folders:
        res = cache.load_array(folder / fname, key)
        if res.array is not None:
            return res.array, labels, {"source": "cache", "cache_path": str(folder / fname),
                                       "cache_reason": "hit", "seconds": time.perf_counter() - t0}
        reasons.append(f"{folder / fname}: {res.reason}")
    items = [str(f) for f in files]
    arr = decode.decode_all(decode.decode_rgb, items, size, num_workers=num_workers, describe=lambda i: items[i])
    arr = arr.reshape(len(labels), len(files) // len(labels), 3, size[0], size[1])
    cache_path: Optional[str]
    try:
        out = paths.first_writable(folders)
        cache.save_array(out / fname, arr, key, {"labels": labels})
        cache_path = str(out / fname)
    except OSError as e:
        warnings.warn(f"MiniImageNet: could not write the decoded-image cache ({e}); the next load decodes again")
        cache_path = None
    return arr, labels, {"source": "decoded", "cache_path": cache_path, "cache_reason": "; ".join(reasons),
                         "seconds": time.perf_counter() - t0}


def load_split(root, split: str, size: Tuple[int, int], cache_dir=None, num_workers=None):
    """(uint8 ``[C, E, 3, H, W]``, labels, info) for ``split``; pickles preferred over images/."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    d = find_data_dir(root, split)
    p = pickle_path(d, split)
    if p.is_file():
        t0 = time.perf_counter()
        arr, labels = load_pickle(p, size)
        return d, arr, labels, {"source": "pickle", "path": str(p), "seconds": time.perf_counter() - t0}
    arr, labels, info = load_folder(d, split, size, cache_dir, num_workers)
    return d, arr, labels, info
