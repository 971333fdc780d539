"""Task-batched layer kernels and the fused path that runs supported models with them.

:mod:`.reference` holds every layer kernel in plain PyTorch (the oracle of the others);
:mod:`.cpp` the C++ CPU kernels (``csrc/layers.cpp``: tasks spread over cores, fused BatchNorm +
activation + max-pool loops); :mod:`fastmaml.triton.layers` the Triton GPU kernels (fused BatchNorm
+ activation + max-pool, and a direct kernel for one-input-channel convolutions); convolutions on
the GPU stay on cuDNN (one grouped convolution for all tasks). :mod:`.program` decides which models
the fused path runs; :mod:`.runner` runs them (forward, backward, R-operator HVP).

``layer_kernels(device, backend)`` picks the implementation of the six swappable kernels
(``conv2d_forward``, ``conv2d_backward``, ``bn_act_pool_{forward,backward,rforward,rbackward}``):

=========  ====================================================================================
backend    layer kernels
=========  ====================================================================================
auto       CPU: cpp when the extension is built, else torch; CUDA: triton when importable, else torch
torch      :mod:`fastmaml.layers.reference`
cpp        :mod:`fastmaml.layers.cpp` (CPU tensors)
triton     :mod:`fastmaml.triton.layers` for BatchNorm blocks and 1-channel convolutions, torch else
cuda       the fused ops' CUDA backend has no layer kernels: as ``auto`` on a CUDA device
=========  ====================================================================================

A backend asked for by name that cannot run raises an error that says why.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

import torch

from . import reference

SWAPPABLE = ("conv2d_forward", "conv2d_backward", "bn_act_pool_forward", "bn_act_pool_backward",
             "bn_act_pool_rforward", "bn_act_pool_rbackward")


def _namespace(name: str, **impls) -> SimpleNamespace:
    ns = SimpleNamespace(name=name)
    for fn in SWAPPABLE:
        setattr(ns, fn, impls.get(fn, getattr(reference, fn)))
    return ns


@functools.lru_cache(maxsize=None)
def _cpp():
    try:
        from . import cpp
    except ImportError as e:  # the module itself is missing (an older checkout)
        return None, f"fastmaml.layers.cpp is not importable ({e})"
    if not getattr(cpp, "AVAILABLE", False):
        return None, getattr(cpp, "REASON", "the C++ layer kernels are not built")
    impls = {fn: getattr(cpp, fn) for fn in SWAPPABLE}
    impls["conv2d_backward"] = _cpu_conv_backward(cpp.conv2d_backward)
    return _namespace("cpp", **impls), ""


# Output positions per task (N * Ho * Wo) from which one ATen convolution backward per task beats the
# grouped call over all tasks on the CPU. Measured at conv4's 64-channel layers, 1 thread, T = 32
# (bench/bench_layers.py): N = 5 at 14x14 (980) per-task 1.48x faster, at 7x7 (245) 1.32x, at 3x3 (45)
# grouped 2.1x faster; N = 10 at 7x7 (490) even; N = 75 at 3x3 (675) even. Both give the same bits.
PER_TASK_BACKWARD_MIN_POSITIONS = 512


def _cpu_conv_backward(per_task):
    """The faster convolution backward per shape on the CPU (bench/bench_layers.py): the C++
    per-task kernel for one-input-channel layers (a weight gradient only, where the grouped
    convolution lowers to a slow depthwise kernel); for the others one ATen backward per task where
    each task's output has at least PER_TASK_BACKWARD_MIN_POSITIONS positions, oneDNN's grouped
    convolution backward over all tasks at once below (small maps, where per-call overhead rules)."""
    def conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        if x.shape[2] == 1:
            return per_task(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        if dy.shape[1] * dy.shape[3] * dy.shape[4] >= PER_TASK_BACKWARD_MIN_POSITIONS:
            return reference.conv2d_backward_per_task(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        return reference.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
    return conv2d_backward


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        from ..triton import layers as tl_layers
    except ImportError as e:
        return None, f"the Triton layer kernels are not importable ({e})"
    impls = {fn: getattr(tl_layers, fn) for fn in SWAPPABLE[2:] if hasattr(tl_layers, fn)}
    fwd1, wgrad1 = getattr(tl_layers, "conv2d_cin1_forward", None), getattr(tl_layers, "conv2d_cin1_weight_grad", None)
    if fwd1 is not None and wgrad1 is not None:
        impls["conv2d_forward"] = _cin1_forward(fwd1)
        impls["conv2d_backward"] = _cin1_backward(wgrad1)
    return _namespace("triton", **impls), ""


def _cin1_forward(direct):
    def conv2d_forward(x, w, b, stride, padding):
        if x.shape[2] == 1 and w.shape[-1] == 3 and padding == 1:
            return direct(x, w, b, stride, padding)
        return reference.conv2d_forward(x, w, b, stride, padding)
    return conv2d_forward


def _cin1_backward(wgrad):
    def conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        if x.shape[2] == 1 and w.shape[-1] == 3 and padding == 1 and not need_dx and need_dw:
            db = dy.sum(dim=(1, 3, 4)) if need_bias else None
            return None, wgrad(dy, x, stride, padding), db
        return reference.conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
    return conv2d_backward


TORCH = _namespace("torch")


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
            dw = impl.conv2d_backward(y, x, w, 1, 1, False, True, False)[1]
            got = [t.float() for t in (out, dz, rout, rdz, y, dw)]
            if impl is ns:
                mine = got
        for a, b in zip(mine, got):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
                return None, "the Triton layer kernels disagree with the reference on this device"
    except Exception as e:  # noqa: BLE001  (a compiler or driver failure of any kind)
        return None, f"the Triton layer kernels failed on {device}: {type(e).__name__}: {e}"
    return ns, ""


def layer_kernels(device: torch.device, backend: Optional[str] = "auto") -> SimpleNamespace:
    backend = backend or "auto"
    if backend == "torch":
        return TORCH
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"layer kernels 'cpp' run on CPU tensors, the model is on {device}")
        ns, why = _cpp()
        if ns is None:
            raise RuntimeError(f"layer kernels 'cpp' are not available: {why}")
        return ns
    if backend == "triton":
        ns, why = _triton_on(device)
        if ns is None:
            raise RuntimeError(f"layer kernels 'triton' are not available: {why}")
        return ns
    if device.type == "cpu":
        ns, _ = _cpp()
        return ns or TORCH
    if device.type == "cuda":
        ns, _ = _triton_on(device)
        return ns or TORCH
    return TORCH
