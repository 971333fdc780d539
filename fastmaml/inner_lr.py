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
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layout import FlatLayout

LR_MODES = ("scalar", "per_step", "per_layer_per_step", "per_parameter")


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
        per_step_values = not isinstance(inner_lr, (int, float))
        values = [float(x) for x in inner_lr] if per_step_values else [float(inner_lr)]
        if not values or not all(math.isfinite(x) for x in values):
            raise ValueError(f"inner_lr must be a finite float or a non-empty sequence of finite floats, got {inner_lr!r}")
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
            init = torch.tensor(values[0])
        elif lr_mode == "per_step":
            init = torch.tensor(values if per_step_values else values * K)
        elif lr_mode == "per_layer_per_step":
            col = torch.tensor(values if per_step_values else values * K)
            init = col[:, None].expand(K, S).clone()
        else:
            init = torch.full((P,), values[0])
        init = init.to(dtype=dtype, device=device)
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
