"""Registration of the fused ops as ``torch.library`` ops: schemas, fake kernels and autograd.

Two op families share one set of formulas:

* ``torch.ops.fastmaml``: the compiled kernels of the C++/CUDA extension (``fastmaml._C``) when it
  is built; otherwise Python defines the schemas here with the reference kernels, so that the op
  namespace exists on every install.
* ``torch.ops.fastmaml_triton``: the Triton kernels, registered when Triton imports.

Every backward is written with the same family's ops, so each op is differentiable any number of
times (second-order MAML differentiates through ``inner_update``):

    inner_update = theta - a*g : d_theta = dout,            d_g = -scale(dout, lr), d_lr = -segment_dot(dout, g)
    scale        = a*v         : d_v     = scale(dout, lr), d_lr = segment_dot(dout, v)
    segment_dot  = R(a*b)      : d_a     = scale(b, dout),  d_b  = scale(a, dout)      (dout has lr's shape)
    reverse_step = (v - hv + w*gq, -R(v*g)):
                   d_v = dout0 - scale(g, dlr), d_hv = -dout0, d_gq = w*dout0, d_g = -scale(v, dlr)

where R sums over tasks and over the elements of a segment, and a dout of shape [T, P] is summed over
tasks wherever the input it flows to was a shared [P] vector.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .schemas import SCHEMAS

_libraries: Dict[str, torch.library.Library] = {}  # kept alive: a dropped Library unregisters its ops


def _fit(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Sum a [T, P] gradient over tasks when the input it belongs to was a shared [P] vector."""
    if x is not None and x.dim() == 2 and like.dim() == 1:
        return x.sum(0)
    return x


def _register_fake(ns: str, lib: torch.library.Library) -> None:
    def inner_update(theta, grad, lr, segments):
        return theta.new_empty(torch.broadcast_shapes(theta.shape, grad.shape))

    def scale(v, lr, segments):
        return torch.empty_like(v)

    def segment_dot(a, b, lr, segments):
        return torch.empty_like(lr)

    def reverse_step(v, hv, g, gq, w, lr, segments):
        return torch.empty_like(v), torch.empty_like(lr)

    for name, fn in (("inner_update", inner_update), ("scale", scale),
                     ("segment_dot", segment_dot), ("reverse_step", reverse_step)):
        torch.library.register_fake(f"{ns}::{name}", fn, lib=lib)


def _register_autograd(ns: str, lib: torch.library.Library) -> None:
    ops = getattr(torch.ops, ns)

    # inner_update ---------------------------------------------------------------------------
    def iu_setup(ctx, inputs, output):
        theta, grad, lr, segments = inputs
        ctx.theta_dim = theta.dim()
        ctx.save_for_backward(grad, lr, segments)

    def iu_backward(ctx, dout):
        grad, lr, segments = ctx.saved_tensors
        d_theta = d_grad = d_lr = None
        if ctx.needs_input_grad[0]:
            d_theta = dout.sum(0) if (dout.dim() == 2 and ctx.theta_dim == 1) else dout
        if ctx.needs_input_grad[1]:
            d_grad = _fit(torch.neg(ops.scale(dout, lr, segments)), grad)
        if ctx.needs_input_grad[2]:
            d_lr = torch.neg(ops.segment_dot(_fit(dout, grad), grad, lr, segments))
        return d_theta, d_grad, d_lr, None

    # scale -----------------------------------------------------------------------------------
    def sc_setup(ctx, inputs, output):
        v, lr, segments = inputs
        ctx.save_for_backward(v, lr, segments)

    def sc_backward(ctx, dout):
        v, lr, segments = ctx.saved_tensors
        d_v = ops.scale(dout, lr, segments) if ctx.needs_input_grad[0] else None
        d_lr = ops.segment_dot(dout, v, lr, segments) if ctx.needs_input_grad[1] else None
        return d_v, d_lr, None

    # segment_dot -----------------------------------------------------------------------------
    def sd_setup(ctx, inputs, output):
        a, b, lr, segments = inputs
        ctx.save_for_backward(a, b, segments)

    def sd_backward(ctx, dout):
        a, b, segments = ctx.saved_tensors
        d_a = ops.scale(b, dout, segments) if ctx.needs_input_grad[0] else None
        d_b = ops.scale(a, dout, segments) if ctx.needs_input_grad[1] else None
        return d_a, d_b, None, None

    # reverse_step ----------------------------------------------------------------------------
    def rs_setup(ctx, inputs, output):
        v, hv, g, gq, w, lr, segments = inputs
        ctx.w = w
        ctx.save_for_backward(v, g, lr, segments)

    def rs_backward(ctx, dout, dlr):
        v, g, lr, segments = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_v = d_hv = d_g = d_gq = None
        if need[0]:
            d_v = dout - ops.scale(g, dlr, segments)
        if need[1]:
            d_hv = torch.neg(dout)
        if need[2]:
            d_g = torch.neg(ops.scale(v, dlr, segments))
        if need[3]:
            d_gq = dout * ctx.w
        return d_v, d_hv, d_g, d_gq, None, None, None

    torch.library.register_autograd(f"{ns}::inner_update", iu_backward, setup_context=iu_setup, lib=lib)
    torch.library.register_autograd(f"{ns}::scale", sc_backward, setup_context=sc_setup, lib=lib)
    torch.library.register_autograd(f"{ns}::segment_dot", sd_backward, setup_context=sd_setup, lib=lib)
    torch.library.register_autograd(f"{ns}::reverse_step", rs_backward, setup_context=rs_setup, lib=lib)


def _on_contiguous(fn: Callable) -> Callable:
    """Kernels index flat memory; autograd and torch.compile may hand them expanded or strided
    tensors (the gradient of a sum is an expanded view), so make every tensor argument dense."""

    def kernel(*args):
        return fn(*(a.contiguous() if isinstance(a, Tensor) else a for a in args))

    kernel.__name__ = getattr(fn, "__name__", "kernel")
    return kernel


def register_family(ns: str, kernels: Optional[ModuleType], device_types=("CPU", "CUDA")) -> None:
    """Make ``torch.ops.<ns>`` complete: schemas and kernels (when ``kernels`` is given: a module
    with the four functions), then fake kernels and autograd. ``kernels=None`` means the schemas and
    kernels come from C++ and only the Python-side pieces are added."""
    if ns in _libraries:
        return
    if kernels is not None:
        lib = torch.library.Library(ns, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            for key in device_types:
                lib.impl(name, _on_contiguous(getattr(kernels, name)), key)
    else:
        lib = torch.library.Library(ns, "FRAGMENT")
    _libraries[ns] = lib
    _register_fake(ns, lib)
    _register_autograd(ns, lib)
