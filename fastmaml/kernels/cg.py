"""The batched conjugate-gradient vector updates of implicit MAML as ``torch.ops.fastmaml_cg`` ops.

``cg_step(x, r, p, Ap, alpha) -> (x + alpha p, r - alpha Ap, ||r_new||^2 per task)`` and
``cg_direction(r, p, beta) -> r + beta p`` over [T, P], with [T] coefficients (see
:mod:`fastmaml.kernels.cg_torch` for the semantics). Backends: ``cpp`` (the C++ CPU kernels of
``fastmaml._C``, ``csrc/cpu/cg.cpp``), ``triton`` (:mod:`fastmaml.triton.cg_ops`; auto on CUDA
tensors, on the CPU only under ``TRITON_INTERPRET=1``) and ``torch`` (:mod:`.cg_torch`; also what the op
namespace runs on other devices, or when the extension is not built). The ops have fake kernels (``torch.compile``,
``opcheck``); they are not differentiable (CG runs outside autograd).
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cg_torch as reference
from . import extension, resolver
from .schemas import CG_SCHEMAS

__all__ = ["CG_SCHEMAS", "cg_step", "cg_direction", "cg_backend", "CG_BACKENDS"]

CG_BACKENDS = ("auto", "torch", "cpp", "triton")

_lock = threading.Lock()
_state = {"compiled": None, "lib": None}


def _setup() -> bool:
    """Register the namespace once; True when the compiled CPU kernels serve it."""
    with _lock:
        if _state["compiled"] is not None:
            return _state["compiled"]
        compiled = extension.load()[0] and not extension.missing_kernels("fastmaml_cg", ("cg_step",), "CPU")
        if compiled:
            lib = torch.library.Library("fastmaml_cg", "FRAGMENT")
            for key in ("CUDA",):
                lib.impl("cg_step", _dense(reference.cg_step), key)
                lib.impl("cg_direction", _dense(reference.cg_direction), key)
        else:
            lib = torch.library.Library("fastmaml_cg", "DEF")
            for name, schema in CG_SCHEMAS.items():
                lib.define(schema)
                for key in ("CPU", "CUDA"):
                    lib.impl(name, _dense(getattr(reference, name)), key)

        def fake_step(x, r, p, Ap, alpha):
            return torch.empty_like(x), torch.empty_like(r), x.new_empty((x.shape[0],))

        def fake_direction(r, p, beta):
            return torch.empty_like(r)

        torch.library.register_fake("fastmaml_cg::cg_step", fake_step, lib=lib)
        torch.library.register_fake("fastmaml_cg::cg_direction", fake_direction, lib=lib)
        _state["lib"] = lib  # kept alive: a dropped Library unregisters its ops
        _state["compiled"] = compiled
        return compiled


def _dense(fn):
    def kernel(*args):
        return fn(*(a.contiguous() if isinstance(a, Tensor) else a for a in args))
    return kernel


def _probe_cpp(device: torch.device) -> Tuple[bool, str]:
    if _setup():
        return True, "compiled CG kernels in fastmaml._C"
    return False, ("fastmaml._C is not loaded or was built without csrc/cpu/cg.cpp; rebuild with "
                   "`pip install --no-build-isolation -e .` or use backend 'torch'")


def _probe_triton(device: torch.device) -> Tuple[bool, str]:
    try:
        from ..triton import cg_ops  # noqa: F401
    except ImportError as e:
        return False, f"the Triton CG kernels are not importable ({e})"
    return True, "Triton CG kernels"


resolver.register("cg", {"cpp": _probe_cpp, "triton": _probe_triton})


def cg_backend(t: Tensor, backend: Optional[str] = None) -> str:
    """The backend serving tensors like ``t`` (the one resolver's rule, :mod:`.resolver`): 'auto'
    takes cpp on the CPU when the extension has the kernels, triton on CUDA when it imports, else
    torch; a backend asked for by name that cannot run here is an error that says why."""
    backend = backend or "auto"
    if backend not in CG_BACKENDS:
        raise ValueError(f"CG kernels: backend must be one of {', '.join(CG_BACKENDS)}, got {backend!r}")
    _setup()
    return resolver.resolve("cg", t.device, backend)


def _check(op: str, like: Tensor, vecs, coef_name: str, coef: Tensor) -> None:
    if like.dim() != 2:
        raise ValueError(f"{op}: expected [T, P] tensors, got shape {list(like.shape)}")
    for name, t in vecs:
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{op}: {name} must be {like.dtype} {list(like.shape)} on {like.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")
    if coef.shape != (like.shape[0],) or coef.dtype != like.dtype or coef.device != like.device:
        raise ValueError(f"{op}: {coef_name} must be {like.dtype} [T] = [{like.shape[0]}] on {like.device}, "
                         f"got {coef.dtype} {list(coef.shape)}")


def cg_step(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor,
            backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(x + alpha p, r - alpha Ap, ||r_new||^2 per task): one pass over [T, P]."""
    _check("cg_step", x, (("r", r), ("p", p), ("Ap", Ap)), "alpha", alpha)
    which = cg_backend(x, backend)
    if which == "torch":
        return reference.cg_step(x, r, p, Ap, alpha)
    if which == "triton":
        from ..triton import cg_ops

        return cg_ops.cg_step(x, r, p, Ap, alpha)
    return torch.ops.fastmaml_cg.cg_step(x, r, p, Ap, alpha)


def cg_direction(r: Tensor, p: Tensor, beta: Tensor, backend: Optional[str] = None) -> Tensor:
    """r + beta p over [T, P]."""
    _check("cg_direction", r, (("p", p),), "beta", beta)
    which = cg_backend(r, backend)
    if which == "torch":
        return reference.cg_direction(r, p, beta)
    if which == "triton":
        from ..triton import cg_ops

        return cg_ops.cg_direction(r, p, beta)
    return torch.ops.fastmaml_cg.cg_direction(r, p, beta)
