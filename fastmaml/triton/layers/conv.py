"""Triton kernels of the one-input-channel convolution (the first layer: x ``[T, N, 1, H, W]``,
w ``[T, O, 1, kh, kw]``, b ``[T, O]`` or None -> y ``[T, N, O, Ho, Wo]``, Ho = (H + 2 padding - kh)
// stride + 1). Semantics: :mod:`fastmaml.layers.torch_kernels`; math: ``docs/design.md`` (the
convolution layer).

A direct kernel: each program computes all O output channels of a block of output pixels of one
(task, image), tap by tap (an outer product of the O weights with the pixels' inputs); its weight
gradient dw ``[T, O, 1, kh, kw]`` reduces, per (task, image, pixel chunk), dy times the shifted
inputs into a workspace that is summed over the chunks afterwards (deterministic).

Arithmetic in float32 (float64 for float64 inputs), results stored in the inputs' dtype.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from .common import Opt, _acc, tl, triton

# Launch configuration (module-level so that tests can shrink it to exercise loops and tails).
_CONV_PIX_BLOCK = 64  # output pixels per conv program (a power of two)
_CONV_PROGRAMS_PER_SM = 4  # weight grad: split each image's pixels until about this many programs per SM
_CONV_SPLIT: Optional[int] = None  # weight grad: force this many pixel chunks per image (tests); None: automatic



@triton.jit
def _conv_cin1_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, O, H, W, Ho, Wo,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, OB: tl.constexpr, PB: tl.constexpr,
):  # fmt: skip
    """Direct convolution with one input channel, for one (task t, image n) and PB output pixels.

    x [T, N, 1, H, W], w [T, O, 1, KH, KW], b [T, O], y [T, N, O, Ho, Wo] (all contiguous):
    y[t, n, o, i, j] = b[t, o] + sum_{kh, kw} w[t, o, 0, kh, kw] x[t, n, 0, i S - P + kh, j S - P + kw]
    (x = 0 outside the image; S = STRIDE, P = PAD). All O channels at once (OB = next power of two
    >= O): per tap, the outer product of the O weights with the PB shifted inputs.
    Grid: (T * N, cdiv(Ho * Wo, PB)).
    """
    pid = tl.program_id(0)  # t * N + n
    t = pid // N
    HWo = Ho * Wo
    pix = tl.program_id(1) * PB + tl.arange(0, PB)
    pm = pix < HWo
    ho = pix // Wo
    wo = pix % Wo
    o = tl.arange(0, OB)
    om = o < O
    xbase = pid.to(tl.int64) * H * W
    wbase = t.to(tl.int64) * O * (KH * KW)
    acc = tl.zeros([OB, PB], dtype=ACC)
    for kh in tl.static_range(KH):
        hi = ho * STRIDE - PAD + kh
        hm = pm & (hi >= 0) & (hi < H)
        for kw in tl.static_range(KW):
            wi = wo * STRIDE - PAD + kw
            xm = hm & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + xbase + hi * W + wi, mask=xm, other=0.0).to(ACC)
            wv = tl.load(w_ptr + wbase + o * (KH * KW) + (kh * KW + kw), mask=om, other=0.0).to(ACC)
            acc += wv[:, None] * xv[None, :]
    if HAS_BIAS:
        bv = tl.load(b_ptr + t.to(tl.int64) * O + o, mask=om, other=0.0).to(ACC)
        acc += bv[:, None]
    yoff = (pid.to(tl.int64) * O + o)[:, None] * HWo + pix[None, :]
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=om[:, None] & pm[None, :])


@triton.jit
def _conv_cin1_wgrad_kernel(
    dy_ptr, x_ptr, ws_ptr,
    N, O, H, W, Ho, Wo, SPLIT,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACC: tl.constexpr, OB: tl.constexpr, PB: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    """Partial weight gradient of the one-input-channel convolution, for one (task t, image n) and
    the pixel blocks s, s + SPLIT, s + 2 SPLIT, ... (s = program_id(1)).

    dy [T, N, O, Ho, Wo], x [T, N, 1, H, W] (contiguous); ws [T, N * SPLIT, O, KB] (ACC):
    ws[t, n SPLIT + s, o, kh KW + kw] = sum over those pixels (i, j) of
    dy[t, n, o, i, j] x[t, n, 0, i S - P + kh, j S - P + kw]   (columns >= KH KW are written 0).
    dw[t, o, 0, kh, kw] is the sum of ws over its second axis. Grid: (T * N, SPLIT).
    """
    pid = tl.program_id(0)  # t * N + n
    s = tl.program_id(1)
    HWo = Ho * Wo
    o = tl.arange(0, OB)
    om = o < O
    kk = tl.arange(0, KB)
    xbase = pid.to(tl.int64) * H * W
    dybase = pid.to(tl.int64) * O * HWo
    acc = tl.zeros([OB, KB], dtype=ACC)
    nblocks = tl.cdiv(HWo, PB)
    for blk in range(s, nblocks, SPLIT):
        pix = blk * PB + tl.arange(0, PB)
        pm = pix < HWo
        ho = pix // Wo
        wo = pix % Wo
        dyv = tl.load(dy_ptr + dybase + o[:, None] * HWo + pix[None, :], mask=om[:, None] & pm[None, :],
                      other=0.0).to(ACC)
        for kh in tl.static_range(KH):
            hi = ho * STRIDE - PAD + kh
            hm = pm & (hi >= 0) & (hi < H)
            for kw in tl.static_range(KW):
                wi = wo * STRIDE - PAD + kw
                xm = hm & (wi >= 0) & (wi < W)
                xv = tl.load(x_ptr + xbase + hi * W + wi, mask=xm, other=0.0).to(ACC)
                part = tl.sum(dyv * xv[None, :], axis=1)  # [OB]
                acc += tl.where(kk[None, :] == kh * KW + kw, part[:, None], 0.0)
    row = pid.to(tl.int64) * SPLIT + s
    tl.store(ws_ptr + (row * O + o)[:, None] * KB + kk[None, :], acc, mask=om[:, None])



# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _conv_shapes(x: Tensor, w: Tensor, stride: int, padding: int):
    T, N, Cin, H, W = x.shape
    if Cin != 1 or w.dim() != 5 or w.shape[2] != 1 or w.shape[0] != T:
        raise ValueError(f"conv2d_cin1 needs x [T, N, 1, H, W] and w [T, O, 1, kh, kw], got {tuple(x.shape)} "
                         f"and {tuple(w.shape)}")
    O, KH, KW = w.shape[1], w.shape[3], w.shape[4]
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    return T, N, H, W, O, KH, KW, Ho, Wo


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def conv2d_cin1_forward(x: Tensor, w: Tensor, b: Opt, stride: int, padding: int) -> Tensor:
    """y [T, N, O, Ho, Wo] = conv2d(x[t], w[t], b[t]) for x [T, N, 1, H, W], w [T, O, 1, kh, kw];
    see :func:`_conv_cin1_fwd_kernel`."""
    x = x.contiguous()
    w = w.contiguous()
    T, N, H, W, O, KH, KW, Ho, Wo = _conv_shapes(x, w, stride, padding)
    y = torch.empty(T, N, O, max(Ho, 0), max(Wo, 0), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    b_arg = w if b is None else b.contiguous()
    acc, _ = _acc(x.dtype)
    ob = triton.next_power_of_2(O)
    pb = _CONV_PIX_BLOCK
    warps = 4 if ob * pb <= 4096 else 8
    _conv_cin1_fwd_kernel[(T * N, triton.cdiv(Ho * Wo, pb))](
        x, w, b_arg, y, N, O, H, W, Ho, Wo,
        STRIDE=int(stride), PAD=int(padding), KH=KH, KW=KW, HAS_BIAS=b is not None,
        ACC=acc, OB=ob, PB=pb, num_warps=warps,
    )  # fmt: skip
    return y


def conv2d_cin1_weight_grad(dy: Tensor, x: Tensor, stride: int, padding: int) -> Tensor:
    """dw [T, O, 1, kh, kw] of conv2d_cin1_forward, for dy [T, N, O, Ho, Wo] and x [T, N, 1, H, W]:
    dw[t, o, 0, kh, kw] = sum_{n, i, j} dy[t, n, o, i, j] x[t, n, 0, i S - P + kh, j S - P + kw].
    The signature carries no kernel size: it is the one that maps (H, W) to (Ho, Wo), 3 where 3 does
    (always for the 3x3, padding 1 layers this kernel is for). See :func:`_conv_cin1_wgrad_kernel`."""
    return _weight_grad(dy, x, stride, padding)


def _kernel_size(H: int, Ho: int, stride: int, padding: int) -> int:
    """The kernel size k of a convolution mapping H to Ho: 3 when consistent, else the smallest k that is."""
    cands = [k for k in range(1, H + 2 * padding + 1) if (H + 2 * padding - k) // stride + 1 == Ho]
    if not cands:
        raise ValueError(f"no kernel size maps {H} to {Ho} with stride {stride}, padding {padding}")
    return 3 if 3 in cands else cands[0]


def _weight_grad(dy: Tensor, x: Tensor, stride: int, padding: int) -> Tensor:
    x = x.contiguous()
    dy = dy.contiguous()
    T, N, Cin, H, W = x.shape
    _, _, O, Ho, Wo = dy.shape
    if Cin != 1:
        raise ValueError(f"conv2d_cin1_weight_grad needs x [T, N, 1, H, W], got {tuple(x.shape)}")
    KH = _kernel_size(H, Ho, stride, padding)
    KW = _kernel_size(W, Wo, stride, padding)
    acc, acc_dtype = _acc(x.dtype)
    if T * N * O * Ho * Wo == 0:
        return torch.zeros(T, O, 1, KH, KW, dtype=x.dtype, device=x.device)
    ob = triton.next_power_of_2(O)
    pb = _CONV_PIX_BLOCK
    kb = triton.next_power_of_2(KH * KW)
    nblocks = triton.cdiv(Ho * Wo, pb)
    if _CONV_SPLIT is not None:
        split = max(1, min(nblocks, int(_CONV_SPLIT)))
    elif x.is_cuda:
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        target = _CONV_PROGRAMS_PER_SM * _sm_count(dev)
        split = max(1, min(nblocks, triton.cdiv(target, T * N)))
    else:
        split = 1
    ws = torch.empty(T, N * split, O, kb, dtype=acc_dtype, device=x.device)
    warps = 4 if ob * pb <= 4096 else 8
    _conv_cin1_wgrad_kernel[(T * N, split)](
        dy, x, ws, N, O, H, W, Ho, Wo, split,
        STRIDE=int(stride), PAD=int(padding), KH=KH, KW=KW, ACC=acc, OB=ob, PB=pb, KB=kb, num_warps=warps,
    )  # fmt: skip
    return ws[..., : KH * KW].sum(dim=1).to(x.dtype).view(T, O, 1, KH, KW)
