"""The C++ CPU layer ops (``torch.ops.fastmaml.*``, csrc) : the probe that says whether they run here.

The ops and their fake kernels are declared by the layer families (``CPP_OPS`` in :mod:`.conv`
and :mod:`.batchnorm`, with the Python wrappers behind the torch implementations' signatures);
this module checks once that the compiled extension (:func:`fastmaml.kernels.extension.load`)
has a CPU kernel for each, and registers the fake kernels so that torch.library.opcheck and
tracing work. Importing it never fails: without the ops ``AVAILABLE`` is False, ``REASON`` says
why, and calling a wrapper raises ``RuntimeError``.

It also keeps the old names (``fastmaml.layers.cpp.conv2d_forward``, ...) of the wrappers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import extension
from . import batchnorm, conv

FAKES = {**conv.CPP_OPS, **batchnorm.CPP_OPS}
OPS = tuple(FAKES)

_lib: Optional[torch.library.Library] = None  # kept alive: it holds the fake registrations


def _probe() -> Tuple[bool, str]:
    # the same load and missing-kernel check that the families' wrappers make (kernels/extension.ops)
    why = extension.why_not_available("fastmaml", OPS)
    if why:
        return False, why
    return True, "C++ layer kernels in fastmaml._C (csrc/cpu/conv.cpp, csrc/cpu/batchnorm.cpp)"


def _register_fake() -> None:
    global _lib
    lib = torch.library.Library("fastmaml", "FRAGMENT")
    for name, fn in FAKES.items():
        torch.library.register_fake(f"fastmaml::{name}", fn, lib=lib)
    _lib = lib


AVAILABLE, REASON = _probe()
if AVAILABLE:
    _register_fake()


def ops():
    """``torch.ops.fastmaml`` when the layer ops run here; else RuntimeError saying why."""
    if not AVAILABLE:
        raise RuntimeError(f"the C++ layer kernels are not available: {REASON}")
    return torch.ops.fastmaml


# the wrappers under their old names (tests, benchmarks)
conv2d_forward = conv.cpp_conv2d_forward
conv2d_backward = conv.cpp_conv2d_backward
bn_act_pool_forward = batchnorm.cpp_bn_act_pool_forward
bn_act_pool_backward = batchnorm.cpp_bn_act_pool_backward
bn_act_pool_rforward = batchnorm.cpp_bn_act_pool_rforward
bn_act_pool_rbackward = batchnorm.cpp_bn_act_pool_rbackward
