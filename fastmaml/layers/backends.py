"""Which implementation runs each swappable layer kernel: ``layer_kernels(device, backend)``.

The swappable kernels are those of the layer families with more than one implementation: the
convolution's two (:mod:`.conv`) and the BatchNorm block's four (:mod:`.batchnorm`). Each family
says which implementation it runs on a concrete backend (its ``family_kernels``); this module
probes the backends and assembles one namespace (``.name`` and the six kernels) per choice:

=========  ====================================================================================
backend    layer kernels
=========  ====================================================================================
auto       CPU: cpp when the extension is built, else torch; CUDA: triton when importable, else torch
torch      the families' torch implementations
cpp        the C++ ops (CPU tensors; probe in :mod:`.cpp`)
triton     :mod:`fastmaml.triton.layers` for BatchNorm blocks and 1-channel convolutions, torch else
cuda       the fused ops' CUDA backend has no layer kernels: as ``auto`` on a CUDA device
=========  ====================================================================================

A backend asked for by name that cannot run raises an error that says why.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ..kernels import resolver
from . import batchnorm, conv

FAMILIES = (conv, batchnorm)
SWAPPABLE = conv.KERNELS + batchnorm.KERNELS


def _namespace(name: str, **impls) -> SimpleNamespace:
    """The kernels of one backend: ``impls`` where given, each family's torch implementation else."""
    ns = SimpleNamespace(name=name)
    defaults = {k: v for family in FAMILIES for k, v in family.family_kernels("torch").items()}
    for fn in SWAPPABLE:
        setattr(ns, fn, impls.get(fn, defaults[fn]))
    return ns


def _of(backend: str, triton_layers=None) -> dict:
    return {k: v for family in FAMILIES for k, v in family.family_kernels(backend, triton_layers).items()}


@functools.lru_cache(maxsize=None)
def _cpp():
    try:
        from . import cpp
    except ImportError as e:  # the module itself is missing (an older checkout)
        return None, f"fastmaml.layers.cpp is not importable ({e})"
    if not getattr(cpp, "AVAILABLE", False):
        return None, getattr(cpp, "REASON", "the C++ layer kernels are not built")
    return _namespace("cpp", **_of("cpp")), ""


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        from ..triton import layers as tl_layers
    except ImportError as e:
        return None, f"the Triton layer kernels are not importable ({e})"
    return _namespace("triton", **_of("triton", tl_layers)), ""


TORCH = _namespace("torch")


def _triton_on_ns(device: torch.device) -> SimpleNamespace:
    return _triton_on(device)[0]


@functools.lru_cache(maxsize=None)
def _triton_on(device: torch.device):
    """The Triton kernels after a one-time probe on ``device``: compile and run each BatchNorm-block
    direction and the one-channel convolution on a tiny input and compare with the reference, so
    that a Triton that cannot build or run them here is reported (and ``auto`` quietly keeps the
    reference) instead of failing inside a meta-step."""
    ns, why = _triton()
    if ns is None:
        return ns, why
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(2, 3, 2, 5, 4, generator=g).to(device)
        gm, bt = (torch.rand(2, 2, generator=g) + 0.5).to(device), torch.randn(2, 2, generator=g).to(device)
        x, w = z[:, :, :1], torch.randn(2, 3, 1, 3, 3, generator=g).to(device)
        for impl in (ns, TORCH):
            out, mean, rstd, idx = impl.bn_act_pool_forward(z, gm, bt, 1e-5, 0.0, 2)
            dz = impl.bn_act_pool_backward(torch.ones_like(out), z, mean, rstd, gm, bt, idx, 0.0, 2)[0]
            rout = impl.bn_act_pool_rforward(z, z, mean, rstd, gm, bt, gm, bt, idx, 0.0, 2)[0]
            rdz = impl.bn_act_pool_rbackward(out, out, z, z, mean, rstd, mean, rstd, gm, bt, gm, idx, 0.0, 2)[0]
            y = impl.conv2d_forward(x, w, None, 1, 1)
            dw = impl.conv2d_backward(y, x, w, 1, 1, need_dx=False, need_dw=True, need_bias=False)[1]
            got = [t.float() for t in (out, dz, rout, rdz, y, dw)]
            if impl is ns:
                mine = got
        for a, b in zip(mine, got):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
                return None, "the Triton layer kernels disagree with the reference on this device"
    except Exception as e:  # noqa: BLE001  (a compiler or driver failure of any kind)
        return None, f"the Triton layer kernels failed on {device}: {type(e).__name__}: {e}"
    return ns, ""


def _probe_cpp(device: torch.device) -> Tuple[bool, str]:
    ns, why = _cpp()
    return ns is not None, why


def _probe_triton(device: torch.device) -> Tuple[bool, str]:
    ns, why = _triton_on(device)
    return ns is not None, why


resolver.register("layers", {"cpp": _probe_cpp, "triton": _probe_triton})
_BY_NAME = {"torch": lambda device: TORCH, "cpp": lambda device: _cpp()[0], "triton": _triton_on_ns}


def layer_kernels(device: torch.device, backend: Optional[str] = "auto") -> SimpleNamespace:
    """The swappable layer kernels for tensors on ``device`` (``.name`` says which backend), as the one
    resolver (:mod:`fastmaml.kernels.resolver`) picks them; 'cuda', the flat ops' CUDA backend, has no
    layer kernels and means 'auto' here."""
    backend = backend or "auto"
    which = resolver.resolve("layers", device, "auto" if backend == "cuda" else backend)
    return _BY_NAME[which](device)
