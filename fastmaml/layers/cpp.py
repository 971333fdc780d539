"""The C++ CPU layer kernels (``csrc/layers.cpp``, ``torch.ops.fastmaml.*``) behind the signatures
of :mod:`fastmaml.layers.reference`.

Each function here takes exactly the reference's arguments and returns what it returns, ``None``
included (the ops return an empty tensor for an output that was not asked for, or for the pool
indices without a pool). Importing this module never fails: without the compiled extension
``AVAILABLE`` is False, ``REASON`` says why, and calling a kernel raises ``RuntimeError``.

Ops (schemas in csrc/layers.cpp; fake kernels registered here so that torch.library.opcheck and
tracing work):

=============================================  ==============================================
torch.ops.fastmaml.                            reference
=============================================  ==============================================
conv2d_tasks                                   conv2d_forward
conv2d_tasks_backward                          conv2d_backward
bn_act_pool_forward                            bn_act_pool_forward
bn_act_pool_backward                           bn_act_pool_backward
bn_act_pool_rforward                           bn_act_pool_rforward
bn_act_pool_rbackward                          bn_act_pool_rbackward
=============================================  ==============================================
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

Opt = Optional[Tensor]

OPS = ("conv2d_tasks", "conv2d_tasks_backward", "bn_act_pool_forward", "bn_act_pool_backward",
       "bn_act_pool_rforward", "bn_act_pool_rbackward")

_lib: Optional[torch.library.Library] = None  # kept alive: it holds the fake registrations


def _probe() -> Tuple[bool, str]:
    if os.environ.get("FASTMAML_NO_EXT") == "1":
        return False, "FASTMAML_NO_EXT=1 is set"
    try:
        import fastmaml._C  # noqa: F401  (loading it registers torch.ops.fastmaml)
    except ImportError as e:
        return False, f"the C++ extension fastmaml._C is not built or failed to load ({e})"
    missing = [name for name in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastmaml::{name}", "CPU")]
    if missing:
        return False, (f"fastmaml._C was built without the layer kernels (no CPU kernel for "
                       f"{', '.join(missing)}): rebuild it (pip install --no-build-isolation -e .)")
    return True, "C++ layer kernels in fastmaml._C (csrc/layers.cpp)"


def _out_hw(h: int, k: int, stride: int, padding: int) -> int:
    return (h + 2 * padding - k) // stride + 1


def _register_fake() -> None:
    global _lib
    lib = torch.library.Library("fastmaml", "FRAGMENT")

    def conv2d_tasks(x, w, b, stride, padding):
        T, N = x.shape[0], x.shape[1]
        return x.new_empty((T, N, w.shape[1], _out_hw(x.shape[3], w.shape[3], stride, padding),
                            _out_hw(x.shape[4], w.shape[4], stride, padding)))

    def conv2d_tasks_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        dx = dy.new_empty(x.shape) if need_dx else dy.new_empty((0,))
        dw = dy.new_empty(w.shape) if need_dw else dy.new_empty((0,))
        db = dy.new_empty((x.shape[0], w.shape[1])) if need_bias else dy.new_empty((0,))
        return dx, dw, db

    def _pooled(z, pool):
        T, N, C, H, W = z.shape
        return (T, N, C, H // 2, W // 2) if pool == 2 else (T, N, C, H, W)

    def bn_act_pool_forward(z, gamma, beta, eps, slope, pool):
        T, C = z.shape[0], z.shape[2]
        idx = z.new_empty(_pooled(z, pool) if pool == 2 else (0,), dtype=torch.uint8)
        return z.new_empty(_pooled(z, pool)), z.new_empty((T, C)), z.new_empty((T, C)), idx

    def bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool):
        T, C = z.shape[0], z.shape[2]
        return torch.empty_like(z), z.new_empty((T, C)), z.new_empty((T, C))

    def bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ugamma, ubeta, idx, slope, pool):
        T, C = z.shape[0], z.shape[2]
        return z.new_empty(_pooled(z, pool)), z.new_empty((T, C)), z.new_empty((T, C))

    def bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ugamma, idx, slope, pool):
        T, C = z.shape[0], z.shape[2]
        return torch.empty_like(z), z.new_empty((T, C)), z.new_empty((T, C))

    for fn in (conv2d_tasks, conv2d_tasks_backward, bn_act_pool_forward, bn_act_pool_backward,
               bn_act_pool_rforward, bn_act_pool_rbackward):
        torch.library.register_fake(f"fastmaml::{fn.__name__}", fn, lib=lib)
    _lib = lib


AVAILABLE, REASON = _probe()
if AVAILABLE:
    _register_fake()


def _ops():
    if not AVAILABLE:
        raise RuntimeError(f"the C++ layer kernels are not available: {REASON}")
    return torch.ops.fastmaml


def _none_if_empty(t: Tensor, asked: bool) -> Opt:
    return t if asked else None


# ---------------------------------------------------------------------------------------------
# The reference's signatures
# ---------------------------------------------------------------------------------------------

def conv2d_forward(x: Tensor, w: Tensor, b: Opt, stride: int, padding: int) -> Tensor:
    return _ops().conv2d_tasks(x, w, b, stride, padding)


def conv2d_backward(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool, need_dw: bool,
                    need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    dx, dw, db = _ops().conv2d_tasks_backward(dy, x, w, stride, padding, bool(need_dx), bool(need_dw),
                                              bool(need_bias))
    return _none_if_empty(dx, need_dx), _none_if_empty(dw, need_dw), _none_if_empty(db, need_bias)


def bn_act_pool_forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float,
                        pool: int) -> Tuple[Tensor, Tensor, Tensor, Opt]:
    out, mean, rstd, idx = _ops().bn_act_pool_forward(z, gamma, beta, float(eps), float(slope), int(pool))
    return out, mean, rstd, (idx if pool == 2 else None)


def bn_act_pool_backward(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt,
                         slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops().bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, float(slope), int(pool))


def bn_act_pool_rforward(rz: Opt, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt,
                         ubeta: Opt, idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops().bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ugamma, ubeta, idx, float(slope), int(pool))


def bn_act_pool_rbackward(dout: Tensor, rdout: Opt, z: Tensor, rz: Opt, mean: Tensor, rstd: Tensor, rmean: Tensor,
                          q: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt, idx: Opt, slope: float,
                          pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops().bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ugamma, idx,
                                        float(slope), int(pool))
