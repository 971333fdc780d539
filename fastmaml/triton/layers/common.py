"""Host-side helpers shared by the Triton layer families (:mod:`.batchnorm`, :mod:`.batchnorm_rop`,
:mod:`.conv`): the accumulation dtype, power-of-two block sizes, the strides of ``[T, C]`` tensors.

Importing this module (so any module of :mod:`fastmaml.triton.layers`) raises ``ImportError`` when
triton is not installed.
"""

from typing import Optional, Tuple

try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or an install that cannot be imported
    raise ImportError(f"fastmaml.triton.layers needs triton: {exc}") from exc

import torch
from torch import Tensor

Opt = Optional[Tensor]


def _acc(dtype: torch.dtype):
    """(triton, torch) accumulation dtype: float64 for float64, else float32."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _s(t: Tensor) -> Tuple[int, int]:
    """Strides of a [T, C] tensor (0 for an expanded axis)."""
    return t.stride(0), t.stride(1)
