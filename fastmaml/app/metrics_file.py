"""``metrics.jsonl``: what training appended up to each checkpoint, and damage found on resume.

Training appends one JSON object per line (:class:`MetricsWriter`) and every checkpoint records
the file as it was when the checkpoint was written (``checkpoint["progress"]["metrics"]``)::

    {"lines": number of lines, "bytes": size in bytes, "sha256": hex digest of those bytes}

Resuming from iteration ``i`` keeps the well-formed lines of iterations <= i (less the ``"partial"``
lines that a stop wrote: the resumed run goes on with their window) and drops the lines written
after the checkpoint (the resumed run writes them again). Before that, :func:`prepare_resume`
compares the file with the record: when its first ``bytes`` bytes are not what training wrote (lines
cut, emptied, shortened, NUL bytes written over, edited) or the file is gone, the damage is reported
(which lines are unreadable, which are kept, how many of the recorded ones are lost) and the damaged
file is kept as ``metrics.jsonl.damaged-<time>`` before the kept lines are written back: nothing
already written is dropped without saying so. Bytes after the recorded ones are the lines of
iterations after the checkpoint (a line torn by a kill included), dropped as before. A checkpoint
without the record (written by an older fastmaml) is checked line by line only: every unreadable
line is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..fsutil import atomic_write

__all__ = ["MetricsWriter", "prepare_resume", "parse_lines", "check_record"]


class MetricsWriter:
    """Appends JSON lines to ``path`` (None: nowhere, for the ranks that do not write) and keeps the
    record of the whole file as written: the file's bytes when it was opened, then every line."""

    def __init__(self, path: Optional[Path]) -> None:
        initial = b""
        if path is not None:
            try:
                initial = Path(path).read_bytes()
            except FileNotFoundError:
                pass
        self._file = open(path if path is not None else os.devnull, "ab")
        self._hash = hashlib.sha256(initial)
        self._lines = initial.count(b"\n")
        self._bytes = len(initial)

    def write(self, obj: Dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        self._file.write(data)
        self._file.flush()
        self._hash.update(data)
        self._lines += 1
        self._bytes += len(data)

    def sync(self) -> None:
        """Flush and fsync: what :meth:`record` describes is on disk before a checkpoint names it."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self) -> Dict[str, Any]:
        return {"lines": self._lines, "bytes": self._bytes, "sha256": self._hash.hexdigest()}

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()


def check_record(record: Any) -> bool:
    """Whether ``record`` has the form :meth:`MetricsWriter.record` gives (a checkpoint's part)."""
    return (isinstance(record, dict)
            and all(isinstance(record.get(k), int) and not isinstance(record.get(k), bool) and record[k] >= 0
                    for k in ("lines", "bytes"))
            and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64)


def parse_lines(data: bytes) -> List[Tuple[int, int, int, Optional[Dict[str, Any]], str]]:
    """Every line of ``data``: (line number from 1, byte offsets where it starts and ends, the metrics
    object or None, why it is unreadable: '' when readable)."""
    out = []
    pos = 0
    number = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        complete = end >= 0
        end = end + 1 if complete else len(data)
        raw = data[pos:end]
        number += 1
        obj, why = None, ""
        if b"\x00" in raw:
            why = "holds NUL bytes"
        else:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                why = "is cut off (no end of line)" if not complete else "is not valid JSON"
            else:
                if not (isinstance(obj, dict) and isinstance(obj.get("iter"), int)):
                    obj, why = None, "is not a metrics line"
        out.append((number, pos, end, obj, why))
        pos = end
    return out


def _span(iters: List[int]) -> str:
    if not iters:
        return ""
    return f" (iteration {iters[0]})" if len(iters) == 1 else f" (iterations {iters[0]}-{iters[-1]})"


def _listing(bad: List[Tuple[int, str]]) -> str:
    shown = [f"line {n} {why}" for n, why in bad[:5]]
    more = f" and {len(bad) - 5} more unreadable lines" if len(bad) > 5 else ""
    return ", ".join(shown) + more


def prepare_resume(path: Path, iteration: int, record: Optional[Dict[str, Any]]) -> Optional[str]:
    """Rewrite ``path`` (atomically) to the lines a run resumed at ``iteration`` keeps; returns a
    report of damage (see the module docstring) or None. ``record``: the checkpoint's record of the
    file (None: none, an older checkpoint or no checkpoint)."""
    path = Path(path)
    try:
        data: Optional[bytes] = path.read_bytes()
    except FileNotFoundError:
        data = None
    lines = parse_lines(data or b"")
    keep = [obj for _, _, _, obj, _ in lines if obj is not None and obj["iter"] <= iteration and not obj.get("partial")]
    report = None
    if iteration > 0:
        report = _damage(path, data, lines, keep, iteration, record)
    if report is not None and data:
        copy = _damaged_name(path)
        with atomic_write(copy, suffix=".tmp") as f:
            f.write(data)
        report += f" The damaged file is kept as {copy}."
    text = "".join(json.dumps(m) + "\n" for m in keep).encode()
    if data != text:
        with atomic_write(path, suffix=".tmp") as f:
            f.write(text)
    return report


def _damage(path: Path, data: Optional[bytes], lines, keep, iteration: int,
            record: Optional[Dict[str, Any]]) -> Optional[str]:
    kept = f"{len(keep)} line{'' if len(keep) == 1 else 's'}{_span([m['iter'] for m in keep])}"
    if record is not None:
        n, size = record["lines"], record["bytes"]
        at = f"the checkpoint of iteration {iteration} was written after {n} lines ({size} bytes)"
        if data is None:
            if n == 0:
                return None
            return (f"{path} is missing: {at}, which are lost. Training goes on from iteration {iteration + 1} "
                    "and writes its lines into a new file.")
        head = data[:size]
        if len(head) == size and hashlib.sha256(head).hexdigest() == record["sha256"]:
            return None
        problems = []
        if len(data) < size:
            problems.append("it is empty" if not data else f"it is shorter ({len(data)} bytes)")
        bad = [(num, why) for num, start, _, _, why in lines if why and start < size]
        if bad:
            problems.append(_listing(bad))
        if not problems:
            problems.append(f"its first {size} bytes differ from what training wrote (edited?)")
        readable = sum(1 for _, _, end, obj, _ in lines if obj is not None and end <= size)
        lost = max(n - readable, 0)
        return (f"{path} is damaged: {'; '.join(problems)}; {at}. Kept: {kept}; lost: {lost} of those {n} "
                f"lines. Training goes on from iteration {iteration + 1}, appending to it.")
    bad = [(num, why) for num, _, _, _, why in lines if why]
    if not bad:
        return None
    return (f"{path} is damaged: {_listing(bad)} (this checkpoint does not record how many lines were written "
            f"before it, so lost lines cannot be counted); kept: {kept}. Training goes on from iteration "
            f"{iteration + 1}, appending to it.")


def _damaged_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy = path.with_name(f"{path.name}.damaged-{stamp}")
    i = 1
    while copy.exists():
        i += 1
        copy = path.with_name(f"{path.name}.damaged-{stamp}-{i}")
    return copy
