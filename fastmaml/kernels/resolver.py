"""The one place that says which backend runs an op family on a device, and why (docs/design.md §7).

Every op the project registers belongs to one of three families: ``flat`` (the flat-layout ops of
:mod:`fastmaml.kernels`), ``cg`` (iMAML's conjugate-gradient updates, :mod:`.cg`) and ``layers``
(the swappable layer kernels, :mod:`fastmaml.layers.backends`). A family registers, once, the
backends it has and a probe per backend (``probe(device) -> (available, reason)``: is the compiled
code loaded, does Triton import and run on this device); this module holds what is common:

* ``auto``: the first available backend of the family's preference for the device type
  (:data:`AUTO`), quietly;
* a backend asked for by name: where it cannot run (wrong device, not built, not importable) a
  ``RuntimeError`` that names the family, the backend and the reason.

=========  ==========================  ===========================  =============================
family     backends                    auto on the CPU              auto on CUDA
=========  ==========================  ===========================  =============================
flat       torch, cpp, cuda, triton    cpp, else torch              cuda, else triton, else torch
cg         torch, cpp, triton          cpp, else torch              triton, else torch
layers     torch, cpp, triton          cpp, else torch              triton, else torch
=========  ==========================  ===========================  =============================

``cpp`` runs on CPU tensors, ``cuda`` on CUDA tensors, ``triton`` on CUDA tensors or, under
``TRITON_INTERPRET=1``, on the CPU; ``torch`` runs anywhere and is never probed.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import torch

Probe = Callable[[torch.device], Tuple[bool, str]]

AUTO: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "flat": {"cpu": ("cpp",), "cuda": ("cuda", "triton")},
    "cg": {"cpu": ("cpp",), "cuda": ("triton",)},
    "layers": {"cpu": ("cpp",), "cuda": ("triton",)},
}

_probes: Dict[str, Dict[str, Probe]] = {}


def register(family: str, probes: Dict[str, Probe]) -> None:
    """The backends a family has besides ``torch``, each with its availability probe."""
    if family not in AUTO:
        raise ValueError(f"unknown op family {family!r}; expected one of {', '.join(AUTO)}")
    _probes[family] = dict(probes)


def backends(family: str) -> Tuple[str, ...]:
    """Every backend name the family accepts ('auto' first)."""
    return ("auto", "torch", *_probes[family])


def triton_runs_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_rule(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot serve tensors on ``device`` ('' when it can)."""
    if backend == "cpp" and device.type != "cpu":
        return f"it runs on CPU tensors, got tensors on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_runs_on_cpu()):
        return ("it needs CUDA tensors, or TRITON_INTERPRET=1 set before fastmaml is imported to run its "
                f"kernels on the CPU; got tensors on {device}")
    return ""


def resolve(family: str, device: torch.device, name: str) -> str:
    """The concrete backend of ``family`` that serves tensors on ``device``; ``name``: 'auto' or one
    of :func:`backends`."""
    probes = _probes[family]
    if name == "auto":
        for cand in AUTO[family].get(device.type, ()):
            if not _device_rule(cand, device) and probes[cand](device)[0]:
                return cand
        return "torch"
    if name == "torch":
        return "torch"
    if name not in probes:
        raise ValueError(f"{family} kernels: unknown backend {name!r}; expected one of {', '.join(backends(family))}")
    why = _device_rule(name, device)
    if not why:
        ok, reason = probes[name](device)
        why = "" if ok else reason
    if why:
        raise RuntimeError(f"{family} kernels: backend {name!r} cannot run here: {why}")
    return name
