"""Triton kernels of the task-batched layers, one module per layer family; semantics:
:mod:`fastmaml.layers.torch_kernels`.

Same signatures and return conventions as the reference (``None`` for an exact zero). Every tensor
carries the task dimension T first; activations are ``[T, N, C, H, W]`` (BatchNorm1d: H = W = 1),
per-channel parameters and statistics ``[T, C]`` (any strides: a shared parameter may be passed
expanded). Inputs are made contiguous here; outputs are fresh contiguous tensors.

BatchNorm + activation + 2x2 max-pool, fused in each of the four directions (forward, backward,
R-forward, R-backward). One program per (task, channel) loops over that channel's M = N * H * W
elements in blocks of BLOCK: a reduction pass (per-lane partial sums, one ``tl.sum`` at the end:
deterministic, no atomics) then an elementwise pass. The pooled tensors (``out``, ``idx``,
``dout``, ``rdout``) are read or written inside the same kernels: the forward and R-forward walk
the pooled outputs (each window's four inputs, or the one at the stored argmax); the backward
passes walk the inputs and pick up the window's gradient where the window's argmax is that input.

The one-input-channel convolution (the first layer: x ``[T, N, 1, H, W]``, w ``[T, O, 1, kh, kw]``)
as a direct kernel: each program computes all O output channels of a block of output pixels of one
(task, image), tap by tap (an outer product of the O weights with the pixels' inputs); its weight
gradient reduces, per (task, image, pixel chunk), dy times the shifted inputs into a workspace that
is summed over the chunks afterwards (deterministic).

Arithmetic in float32 (float64 for float64 inputs), results stored in the inputs' dtype. Scalars
(eps, slope) are passed as float64 and cast to the accumulation type in the kernel. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels also run on CPU tensors.

Modules: :mod:`.batchnorm` (device helpers, forward, backward) and :mod:`.batchnorm_rop` (R-forward,
R-backward) for the BatchNorm block; :mod:`.conv` for the one-input-channel convolution; :mod:`.common`
for the shared host helpers. This package re-exports their launchers (and kernels), so
``from fastmaml.triton import layers; layers.bn_act_pool_forward(...)`` works as before. The launch
configuration lives in the family's module (``batchnorm._BN_MAX_BLOCK``, ``conv._CONV_SPLIT`` ...):
patch it there.

Importing this package raises ``ImportError`` when triton is not installed.
"""
# Fail with the message callers match before any submodule import (also when this file is executed
# on its own, outside the package).
try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or an install that cannot be imported
    raise ImportError(f"fastmaml.triton.layers needs triton: {exc}") from exc

from .batchnorm import _bn_bwd_kernel, _bn_fwd_kernel, bn_act_pool_backward, bn_act_pool_forward
from .batchnorm_rop import _bn_rbwd_kernel, _bn_rfwd_kernel, bn_act_pool_rbackward, bn_act_pool_rforward
from .conv import _conv_cin1_fwd_kernel, _conv_cin1_wgrad_kernel, conv2d_cin1_forward, conv2d_cin1_weight_grad

__all__ = [
    "bn_act_pool_forward",
    "bn_act_pool_backward",
    "bn_act_pool_rforward",
    "bn_act_pool_rbackward",
    "conv2d_cin1_forward",
    "conv2d_cin1_weight_grad",
]
