"""Inner-loop learning rates: fixed or learnable, in the four forms MAML and its successors use.

==================== ============ ===================================================
lr_mode              shape        step k, adapted tensor i, element p uses
==================== ============ ===================================================
scalar               []           lr
per_step             [K]          lr[k]
per_layer_per_step   [K, S]       lr[k, i]                      (MAML++ LSLR)
per_parameter        [P]          lr[p]                         (Meta-SGD; all steps)
==================== ============ ===================================================

S is the number of adapted tensors and P the number of adapted elements. ``rate(k)`` gives step k's
rate in the fused ops' form: 0-d, [S] with the layout's segments, or [P].
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .layout import FlatLayout

LR_MODES = ("scalar", "per_step", "per_layer_per_step", "per_parameter")


_WHAT = "inner_lr must be a number >= 0, a sequence of them (one per step), or a 0-d or 1-d tensor"


def _number(x, inner_lr) -> float:
    """One rate: a real number (Python, numpy or a one-element tensor), finite and >= 0."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.dim() > 1:
            raise ValueError(f"{_WHAT}; got a tensor of shape {list(x.shape)} inside {inner_lr!r}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{_WHAT}; got a {x.dtype} tensor")
        v = float(x.detach().reshape(()).item())
    elif isinstance(x, np.ndarray) and x.ndim == 0:
        return _number(x.item(), inner_lr)
    elif isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{_WHAT}; got a bool ({x!r})")
    elif isinstance(x, numbers.Real):
        v = float(x)
    elif isinstance(x, str):
        raise TypeError(f"{_WHAT}; got a str {x!r}")
    else:
        raise TypeError(f"{_WHAT}; got {type(x).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"inner_lr must be finite, got {v}")
    if v < 0:
        raise ValueError(f"inner_lr must be >= 0, got {v:g}")
    return v


def parse_inner_lr(inner_lr) -> Tuple[bool, List[float]]:
    """(one value per step?, the values) of an ``inner_lr`` argument, checked (see ``_WHAT``)."""
    if isinstance(inner_lr, Tensor):
        if inner_lr.dim() > 1:
            raise ValueError(f"{_WHAT}; got a tensor of shape {list(inner_lr.shape)}")
        if inner_lr.dim() == 0:
            return False, [_number(inner_lr, inner_lr)]
        items = list(inner_lr.detach().cpu().unbind(0))
    elif isinstance(inner_lr, np.ndarray):
        if inner_lr.ndim > 1:
            raise ValueError(f"{_WHAT}; got an array of shape {list(inner_lr.shape)}")
        if inner_lr.ndim == 0:
            return False, [_number(inner_lr, inner_lr)]
        items = list(inner_lr)
    elif isinstance(inner_lr, (str, bytes, dict, set)) or not isinstance(inner_lr, Sequence):
        return False, [_number(inner_lr, inner_lr)]
    else:
        items = list(inner_lr)
    if not items:
        raise ValueError(f"{_WHAT}; got an empty {type(inner_lr).__name__}")
    return True, [_number(x, inner_lr) for x in items]


class InnerLR(nn.Module):
    """The inner learning rates; ``.lr`` is an ``nn.Parameter`` when learnable, else a buffer."""

    def __init__(
        self,
        inner_lr: Union[float, Sequence[float]],
        inner_steps: int,
        layout: FlatLayout,
        lr_mode: Optional[str] = None,
        learnable: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        per_step_values, values = parse_inner_lr(inner_lr)
        if per_step_values and len(values) != inner_steps:
            raise ValueError(f"inner_lr has {len(values)} values but inner_steps={inner_steps}; give one per step")
        if lr_mode is None:
            lr_mode = "per_step" if per_step_values else "scalar"
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {', '.join(LR_MODES)}, got {lr_mode!r}")
        if per_step_values and lr_mode in ("scalar", "per_parameter"):
            raise ValueError(f"lr_mode={lr_mode!r} takes one inner_lr value for all steps, got {len(values)} values")
        K, S, P = inner_steps, layout.num_segments, layout.numel
        if lr_mode == "scalar":
            init = torch.tensor(values[0], dtype=torch.float64)
        elif lr_mode == "per_step":
            init = torch.tensor(values if per_step_values else values * K, dtype=torch.float64)
        elif lr_mode == "per_layer_per_step":
            col = torch.tensor(values if per_step_values else values * K, dtype=torch.float64)
            init = col[:, None].expand(K, S).clone()
        else:
            init = torch.full((P,), values[0], dtype=torch.float64)
        init = init.to(dtype=dtype, device=device)  # built in float64: a float64 model gets the rate given, not its float32 rounding
        self.mode = lr_mode
        self.learnable = learnable
        if learnable:
            self.lr = nn.Parameter(init)
        else:
            self.register_buffer("lr", init)

    @property
    def max_steps(self) -> Optional[int]:
        """The number of steps the rates cover (None: any number)."""
        return self.lr.shape[0] if self.mode in ("per_step", "per_layer_per_step") else None

    def check_steps(self, steps: int) -> None:
        if self.max_steps is not None and steps > self.max_steps:
            raise ValueError(
                f"steps={steps} exceeds the {self.max_steps} per-step learning rates of lr_mode={self.mode!r}"
            )

    def rate(self, k: int, lr: Optional[Tensor] = None) -> Tuple[Tensor, bool]:
        """Step k's rate in the ops' form, and whether it is per segment (needs the segments)."""
        lr = self.lr if lr is None else lr
        if self.mode == "scalar":
            return lr, False
        if self.mode == "per_step":
            return lr[k], False
        if self.mode == "per_layer_per_step":
            return lr[k], True
        return lr, False

    def for_tensor(self, k: int, i: int, layout: FlatLayout, lr: Optional[Tensor] = None) -> Tensor:
        """Step k's rate for adapted tensor i, broadcastable to its shape (the reference's view)."""
        lr = self.lr if lr is None else lr
        if self.mode == "scalar":
            return lr
        if self.mode == "per_step":
            return lr[k]
        if self.mode == "per_layer_per_step":
            return lr[k, i]
        a, b = layout.offsets[i], layout.offsets[i + 1]
        return lr[a:b].view(layout.shapes[i])

    def accumulate(self, grad: Tensor, k: int, d_rate: Tensor) -> None:
        """Add step k's rate gradient (shaped like ``rate(k)``) into ``grad`` (shaped like ``lr``)."""
        if self.mode in ("per_step", "per_layer_per_step"):
            grad[k] += d_rate
        else:
            grad += d_rate
