"""Pooling and reshaping layers: 2x2 max-pool, the global spatial mean, flatten.

Max-pool (kernel 2, stride 2, no padding, floor: an odd last row/column is dropped), x [T, N, C, H, W]:

    out[.., i, j] = max over the window W_ij = {(2i + a, 2j + b): a, b in {0, 1}} of x
    idx[.., i, j] = the position 0..3 (row-major, a * 2 + b) of that maximum, first on ties as
                    torch's max_pool2d picks it (uint8, out's shape [T, N, C, H // 2, W // 2])

* forward:    (out, idx)
* backward:   dL/dx = scatter of dL/dout to each window's argmax (zero elsewhere, and on a dropped row/column)
* R-forward:  R{out} = R{x} gathered at the forward's argmax (the argmax is locally constant)
* R-backward: R{dL/dx} = scatter of R{dL/dout}, as the backward

Global mean over space, x [T, N, C, H, W] -> [T, N, C] (``keepdim``: [T, N, C, 1, 1]); linear, so
its R-forward is itself and its R-backward is its backward: dL/dx = dL/dy / (H W) broadcast.

Flatten (start_dim 1 of each task's batch): [T, N, ...] -> [T, N, F]; backward and R-backward
reshape back.

The pool helpers take ``pool`` (0: none, 2: 2x2) because the fused BatchNorm block
(:mod:`.batchnorm`) uses them as its torch implementation too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .node import PassContext, Saved
from .tensors import Opt


def pool_forward(h: Tensor, pool: int) -> Tuple[Tensor, Opt]:
    """(out, idx) of the 2x2 max-pool (``pool`` = 2), or (h, None) without one (``pool`` = 0)."""
    if pool == 0:
        return h, None
    T, N, C, H, W = h.shape
    Ho, Wo = H // 2, W // 2
    win = h[:, :, :, :2 * Ho, :2 * Wo].reshape(T, N, C, Ho, 2, Wo, 2).permute(0, 1, 2, 3, 5, 4, 6)
    win = win.reshape(T, N, C, Ho, Wo, 4)
    out, idx = win.max(dim=-1)
    return out, idx.to(torch.uint8)


def pool_gather(r: Tensor, idx: Opt, pool: int) -> Tensor:
    """r [T, N, C, H, W] at each window's recorded maximum ``idx`` (the max-pool's R-forward)."""
    if pool == 0:
        return r
    T, N, C, H, W = r.shape
    Ho, Wo = H // 2, W // 2
    win = r[:, :, :, :2 * Ho, :2 * Wo].reshape(T, N, C, Ho, 2, Wo, 2).permute(0, 1, 2, 3, 5, 4, 6)
    win = win.reshape(T, N, C, Ho, Wo, 4)
    return win.gather(-1, idx.long()[..., None])[..., 0]


def pool_scatter(d: Tensor, idx: Opt, pool: int, H: int, W: int) -> Tensor:
    """d [T, N, C, Ho, Wo] scattered to each window's maximum in a zero [T, N, C, H, W] (backward)."""
    if pool == 0:
        return d
    T, N, C, Ho, Wo = d.shape
    win = torch.zeros(T, N, C, Ho, Wo, 4, dtype=d.dtype, device=d.device)
    win.scatter_(-1, idx.long()[..., None], d[..., None])
    full = win.view(T, N, C, Ho, Wo, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(T, N, C, 2 * Ho, 2 * Wo)
    if (2 * Ho, 2 * Wo) != (H, W):
        full = F.pad(full, (0, W - 2 * Wo, 0, H - 2 * Ho))
    return full


def maxpool_forward(x: Tensor) -> Tuple[Tensor, Tensor]:
    return pool_forward(x, 2)


def maxpool_gather(r: Tensor, idx: Tensor) -> Tensor:
    """R-forward of the max-pool (and nothing else): r at each window's maximum."""
    return pool_gather(r, idx, 2)


def maxpool_scatter(d: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    """Backward (and R-backward) of the max-pool."""
    return pool_scatter(d, idx, 2, H, W)


def global_mean_forward(x: Tensor) -> Tensor:
    """[T, N, C, H, W] -> [T, N, C]."""
    return x.mean(dim=(3, 4))


def global_mean_backward(dy: Tensor, H: int, W: int) -> Tensor:
    return (dy / (H * W))[..., None, None].expand(*dy.shape, H, W)


# -- runner nodes ------------------------------------------------------------------------------

@dataclass
class MaxPoolSaved(Saved):
    shape: Optional[torch.Size] = None   # the input's [T, N, C, H, W]
    idx: Optional[Tensor] = None         # uint8 argmax per window


@dataclass(frozen=True)
class MaxPool:
    """A standalone MaxPool2d(2) (one not fused into a BatchNorm block)."""

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        shape = h.shape
        out, idx = maxpool_forward(h)
        return out, (MaxPoolSaved(shape=shape, idx=idx) if save else None)

    def backward(self, ctx: PassContext, s: MaxPoolSaved, d: Tensor, need_dx: bool) -> Tensor:
        return maxpool_scatter(d, s.idx, s.shape[-2], s.shape[-1])

    def rforward(self, ctx: PassContext, s: MaxPoolSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        return None if r is None else maxpool_gather(r, s.idx)

    def rbackward(self, ctx: PassContext, s: MaxPoolSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        return None if rd is None else maxpool_scatter(rd, s.idx, s.shape[-2], s.shape[-1])


@dataclass
class ShapeSaved(Saved):
    shape: Optional[torch.Size] = None   # the input's shape


@dataclass(frozen=True)
class GlobalMean:
    """AdaptiveAvgPool2d(1) (``keepdim``) or Conv4's mean over space (not ``keepdim``)."""

    keepdim: bool

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        s = ShapeSaved(shape=h.shape) if save else None
        h = global_mean_forward(h)
        if self.keepdim:
            h = h[..., None, None]
        return h, s

    def backward(self, ctx: PassContext, s: ShapeSaved, d: Tensor, need_dx: bool) -> Tensor:
        return global_mean_backward(d.reshape(s.shape[:3]), s.shape[-2], s.shape[-1])

    def rforward(self, ctx: PassContext, s: ShapeSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        if r is not None:
            r = global_mean_forward(r)
            if self.keepdim:
                r = r[..., None, None]
        return r

    def rbackward(self, ctx: PassContext, s: ShapeSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        return None if rd is None else global_mean_backward(rd.reshape(s.shape[:3]), s.shape[-2], s.shape[-1])


@dataclass(frozen=True)
class Flatten:
    """nn.Flatten (start_dim 1, end_dim -1): each task's [N, ...] as [N, F]."""

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        s = ShapeSaved(shape=h.shape) if save else None
        return h.reshape(h.shape[0], h.shape[1], -1), s

    def backward(self, ctx: PassContext, s: ShapeSaved, d: Tensor, need_dx: bool) -> Tensor:
        return d.reshape(s.shape)

    def rforward(self, ctx: PassContext, s: ShapeSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        return None if r is None else r.reshape(r.shape[0], r.shape[1], -1)

    def rbackward(self, ctx: PassContext, s: ShapeSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        return None if rd is None else rd.reshape(s.shape)
