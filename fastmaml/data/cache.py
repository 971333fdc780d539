"""A single-array file cache with a key and a checksum.

File layout (all little-endian)::

    MAGIC (16 bytes) | header length (uint64) | header (UTF-8 JSON) | zero padding to 64 | payload

The header holds ``key`` (what the array was built from: a fingerprint of the sources and the
preprocessing settings), ``shape``, ``dtype``, ``nbytes``, the payload's ``sha256`` and free-form
``meta`` (e.g. class names). ``load_array`` returns the array only when the magic, the key, the
size and the checksum all match; otherwise it reports why, and the caller rebuilds. Files are
written with ``fsutil.atomic_write``, so a crash mid-write never leaves a file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

import numpy as np

from ..fsutil import atomic_write

MAGIC = b"FASTMAML-CACHE\x00\x01"
_ALIGN = 64
_MAX_HEADER = 64 << 20


class CacheResult(NamedTuple):
    array: Optional[np.ndarray]  # None on a miss
    meta: Optional[Dict[str, Any]]
    reason: str  # "hit", "missing", "stale: ...", "corrupt: ..."


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def save_array(path: Path, array: np.ndarray, key: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> None:
    """Write ``array`` (any fixed-size dtype, C order) with ``key`` and ``meta`` atomically to ``path``."""
    array = np.ascontiguousarray(array)
    payload = memoryview(array).cast("B")
    header = {
        "key": key,
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "nbytes": int(array.nbytes),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "meta": meta or {},
    }
    hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
    start = len(MAGIC) + 8 + len(hbytes)
    pad = (-start) % _ALIGN
    with atomic_write(Path(path)) as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        f.write(b"\0" * pad)
        f.write(payload)


def load_array(path: Path, key: Dict[str, Any]) -> CacheResult:
    """Read the array at ``path`` if it was built for exactly ``key`` and is intact."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return CacheResult(None, None, "missing")
    except OSError as e:
        return CacheResult(None, None, f"corrupt: cannot open ({e})")
    with f:
        try:
            if f.read(len(MAGIC)) != MAGIC:
                return CacheResult(None, None, "corrupt: bad magic")
            raw_len = f.read(8)
            if len(raw_len) != 8:
                return CacheResult(None, None, "corrupt: truncated header")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > _MAX_HEADER:
                return CacheResult(None, None, "corrupt: header too large")
            hbytes = f.read(hlen)
            header = json.loads(hbytes.decode("utf-8"))
            if _canonical(header.get("key")) != _canonical(key):
                return CacheResult(None, None, "stale: built from other sources or settings")
            shape = tuple(int(s) for s in header["shape"])
            dtype = np.dtype(header["dtype"])
            nbytes = int(header["nbytes"])
            if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                return CacheResult(None, None, "corrupt: shape and size disagree")
            start = len(MAGIC) + 8 + hlen
            f.seek(start + (-start) % _ALIGN)
            buf = np.empty(nbytes, dtype=np.uint8)
            got = f.readinto(memoryview(buf))
            if got != nbytes or f.read(1):
                return CacheResult(None, None, "corrupt: payload size mismatch")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
            return CacheResult(None, None, f"corrupt: {e}")
    if hashlib.sha256(memoryview(buf)).hexdigest() != header["sha256"]:
        return CacheResult(None, None, "corrupt: checksum mismatch")
    return CacheResult(buf.view(dtype).reshape(shape), header.get("meta", {}), "hit")
