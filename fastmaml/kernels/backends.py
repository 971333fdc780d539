"""Which kernel implementations exist on this install, and which one serves a call.

Backends:

=========  ==========================================  =====================================
name       implementation                              runs on
=========  ==========================================  =====================================
torch      ``fastmaml.kernels.flat_torch``           any device
cpp        ``torch.ops.fastmaml`` from ``fastmaml._C``  CPU tensors
cuda       ``torch.ops.fastmaml`` from ``fastmaml._C``  CUDA tensors (a CUDA build of the extension)
triton     ``torch.ops.fastmaml_triton``               CUDA tensors; CPU under TRITON_INTERPRET=1
=========  ==========================================  =====================================

Each optional piece is probed once, on first use (the extension by :mod:`.extension`, the one probe
that the CG ops (:mod:`.cg`) and the layer ops (``fastmaml.layers.cpp``) use too). Which backend
serves a call is the one resolver's rule (:mod:`.resolver`, family ``flat``): ``auto`` quietly takes
the fastest one available for the tensors' device (CPU: cpp, else torch; CUDA: cuda, else triton,
else torch), while a backend asked for by name that cannot run raises an error that says why.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from . import extension, flat_torch, resolver
from .resolver import triton_runs_on_cpu  # noqa: F401  (imported from here by tests and bench)
from .registry import register_family

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

_lock = threading.Lock()
_probed: Dict[str, Tuple[bool, str]] = {}
_selected: Optional[str] = None


def _probe_extension() -> Tuple[bool, str]:
    loaded, reason = extension.load()
    if loaded:
        register_family("fastmaml", None)
        return True, reason
    # The op namespace exists on every install: without the extension, its kernels are the torch ones.
    register_family("fastmaml", flat_torch)
    return False, reason


def _probe_cuda_kernels() -> Tuple[bool, str]:
    ok, why = probe("cpp")
    if not ok:
        return False, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastmaml::inner_update", "CUDA"):
        return False, "fastmaml._C was built without CUDA kernels (a CPU build of torch, or no nvcc)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, "CUDA kernels in fastmaml._C"


def _probe_triton() -> Tuple[bool, str]:
    try:
        from ..triton import ops as triton_ops
    except ImportError as e:
        return False, f"triton is not installed or failed to import ({e})"
    register_family("fastmaml_triton", triton_ops)
    return True, "triton " + getattr(__import__("triton"), "__version__", "?")


def probe(name: str) -> Tuple[bool, str]:
    """(available, reason) for a backend; cached after the first call."""
    if name == "torch":
        return True, "plain PyTorch"
    with _lock:
        if name not in _probed:
            if name == "cpp":
                _probed[name] = _probe_extension()
            elif name == "triton":
                _probed[name] = _probe_triton()
    if name == "cuda" and name not in _probed:
        _probed[name] = _probe_cuda_kernels()
    if name not in _probed:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return _probed[name]


def available_backends() -> Dict[str, str]:
    """Every backend with 'available' or the reason it is not."""
    out = {}
    for name in BACKENDS[1:]:
        ok, why = probe(name)
        out[name] = "available" if ok else why
    return out


def _check_explicit(name: str) -> None:
    ok, why = probe(name)
    if not ok:
        raise RuntimeError(f"fastmaml kernel backend {name!r} is unavailable: {why}")


def set_backend(name: str) -> None:
    """Select the kernel backend for every fused op: 'auto', 'torch', 'cpp', 'cuda' or 'triton'."""
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name != "auto":
        _check_explicit(name)
    _selected = name


def get_backend() -> str:
    """The selected backend name (``FASTMAML_KERNELS`` if set, else 'auto')."""
    global _selected
    if _selected is None:
        set_backend(os.environ.get("FASTMAML_KERNELS", "auto") or "auto")
    return _selected  # type: ignore[return-value]


def resolve(device: torch.device, name: Optional[str] = None) -> str:
    """The concrete backend that serves the flat-layout ops on tensors on ``device`` (the rule is
    the one resolver's, :mod:`.resolver`; an unknown name is refused by :func:`set_backend`'s check)."""
    name = name or get_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return resolver.resolve("flat", device, name)


resolver.register("flat", {name: (lambda device, name=name: probe(name)) for name in ("cpp", "cuda", "triton")})


def implementation(backend: str) -> ModuleType:
    """The object whose attributes are the four ops for a concrete backend."""
    if backend == "torch":
        return flat_torch
    if backend in ("cpp", "cuda"):
        probe("cpp")
        return torch.ops.fastmaml
    if backend == "triton":
        probe("triton")
        return torch.ops.fastmaml_triton
    raise ValueError(f"not a concrete backend: {backend!r}")
