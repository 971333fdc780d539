"""Shared pieces of the benchmarks: machine description, timing, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine(device: str = "cpu") -> Dict[str, object]:
    """What the numbers were measured on."""
    info: Dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n", 1)[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            info["cpu_model"] = fields["model name"]
        # A virtual machine often names every CPU generation the same ("AMD EPYC"): family and model
        # tell them apart, and their speeds differ by up to 2x.
        if "cpu family" in fields and "model" in fields:
            info["cpu_family_model"] = f"{fields['cpu family']}/{fields['model']}"
    except (OSError, ValueError):
        pass
    # The instruction set torch's CPU kernels dispatch to (AVX2, AVX512, ...): convolution speed and
    # float32 rounding depend on it, so a run resumed on another one is no longer bitwise the same.
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info.get("cpu_model", info["processor"])
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 1,
                min_time: float = 0.0) -> Dict[str, float]:
    """Median (and min, max) seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs; each
    run repeats ``fn`` until it lasts ``min_time`` so that tiny ops are timed above the clock's noise."""
    for _ in range(warmup):
        fn()
    sync(device)
    inner = 1
    if min_time > 0:
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(min_time / one))
    samples: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": repeats, "inner": inner}


def table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def write_json(name: str, payload: Dict[str, object], out_dir: Optional[str] = None) -> str:
    """Write ``payload`` atomically to ``<out_dir>/<name>.json``; returns the path."""
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix="." + name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def device_tag(device: str) -> str:
    """A file-name-safe name for the machine: the GPU's name, or 'cpu'."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()
