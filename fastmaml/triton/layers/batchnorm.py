"""Triton kernels of the fused BatchNorm + activation + 2x2 max-pool block: device helpers, the
forward and the backward (the R-passes: :mod:`.batchnorm_rop`). Semantics:
:mod:`fastmaml.layers.torch_kernels`; math: ``docs/design.md`` (the BatchNorm block's four passes).

Shapes: z ``[T, N, C, H, W]`` (BatchNorm1d: H = W = 1); gamma, beta, mean, rstd ``[T, C]`` (any
strides: a shared parameter may be passed expanded); out, idx (uint8, the window position of each
maximum) ``[T, N, C, Ho, Wo]`` with Ho, Wo = H // 2, W // 2 when pool = 2, else H, W.

  forward   out = maxpool(act(gamma (z - mean) rstd + beta)), mean and rstd per (task, channel)
  backward  dz [T, N, C, H, W], dgamma, dbeta [T, C] from dout

One program per (task, channel) loops over that channel's M = N * H * W elements in blocks of BLOCK:
a reduction pass (per-lane partial sums, one ``tl.sum`` at the end: deterministic, no atomics) then
an elementwise pass. The pooled tensors (``out``, ``idx``, ``dout``) are read or written inside the
same kernels: the forward walks the pooled outputs (each window's four inputs); the backward walks
the inputs and picks up the window's gradient where the window's argmax is that input.

Arithmetic in float32 (float64 for float64 inputs), results stored in the inputs' dtype. Scalars
(eps, slope) are passed as float64 and cast to the accumulation type in the kernel. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels also run on CPU tensors.
"""

from typing import Tuple

import torch
from torch import Tensor

from .common import Opt, _acc, _pow2_block, _s, tl, triton

# Launch configuration (module-level so that tests can shrink it to exercise loops and tails; the
# R-passes of :mod:`.batchnorm_rop` use it too, through :func:`_bn_config`).
_BN_MAX_BLOCK = 1024  # elements per loop iteration of a (task, channel) program (a power of two)
_BN_MIN_BLOCK = 32


# ---------------------------------------------------------------------------------------------
# BatchNorm + activation + max-pool: device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_addr(t, c, n, N, C, HW):
    """Offset (int64) of element (t, n, c, 0, 0) of a contiguous [T, N, C, H, W] tensor; n a vector."""
    return ((t * N + n.to(tl.int64)) * C + c) * HW


@triton.jit
def _bn_act(zv, mean, rstd, g, b, slope):
    """(xh, a, dh/da) for z values ``zv``: xh = (z - mean) rstd, a = g xh + b; dh/da of the
    activation is 1 where a > 0, ``slope`` elsewhere."""
    xh = (zv - mean) * rstd
    a = g * xh + b
    return xh, a, tl.where(a > 0, 1.0, slope).to(a.dtype)


@triton.jit
def _elem_offsets(e, t, c, N, C, H, W):
    """For element indices e in [0, N*H*W) of channel (t, c): (offset into [T, N, C, H, W], n, h, w)."""
    HW = H * W
    n = e // HW
    hw = e % HW
    return ((t * N + n.to(tl.int64)) * C + c) * HW + hw, n, hw // W, hw % W  # as _row_addr (inlined)


@triton.jit
def _window_grad(d_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL: tl.constexpr, off, ACC: tl.constexpr):
    """The upstream gradient at input (n, h, w) of channel (t, c), masked by m.

    POOL 0: d[off] (d has the input's shape). POOL 2: d[t, n, c, h//2, w//2] where the window's stored
    argmax idx is this input's position (h%2)*2 + w%2, else 0 (also 0 in a dropped odd row/column).
    """
    if POOL == 0:
        dv = tl.load(d_ptr + off, mask=m, other=0.0).to(ACC)
    else:
        ho = h // 2
        wo = w // 2
        inwin = m & (ho < Ho) & (wo < Wo)
        ooff = ((t * N + n.to(tl.int64)) * C + c) * (Ho * Wo) + ho * Wo + wo  # as _row_addr (inlined)
        ix = tl.load(idx_ptr + ooff, mask=inwin, other=255).to(tl.int32)
        sel = inwin & (ix == (h % 2) * 2 + (w % 2))
        dv = tl.load(d_ptr + ooff, mask=sel, other=0.0).to(ACC)
        dv = tl.where(sel, dv, 0.0)
    return dv


@triton.jit
def _load_tc(ptr, t, c, s_t, s_c, ACC: tl.constexpr):
    """ptr[t, c] of a [T, C] tensor with strides (s_t, s_c), as ACC."""
    return tl.load(ptr + t.to(tl.int64) * s_t + c.to(tl.int64) * s_c).to(ACC)


# ---------------------------------------------------------------------------------------------
# BatchNorm + activation + max-pool: kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bn_fwd_kernel(
    z_ptr, g_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, idx_ptr,
    sg_t, sg_c, sb_t, sb_c,
    eps: "fp64", slope: "fp64", Mtot: "fp64",
    N, C, H, W, Ho, Wo,
    POOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Forward of BatchNorm (batch statistics) + activation + max-pool for one (task t, channel c).

    z [T, N, C, H, W]; gamma, beta [T, C] (strides sg_*, sb_*); M = N H W.
    mean = sum z / M, var = sum (z - mean)^2 / M (biased), rstd = 1 / sqrt(var + eps), stored in
    mean, rstd [T, C] (contiguous). The sums are taken around a shift K (the mean of the first block)
    in one pass: mean = K + S1 / M, var = S2 / M - (S1 / M)^2 with S1 = sum (z - K), S2 = sum (z - K)^2.
    a = gamma (z - mean) rstd + beta, h = a if a > 0 else slope a.
    POOL 0: out = h [T, N, C, H, W]. POOL 2: out [T, N, C, H//2, W//2] = max of each 2x2 window
    (floor: an odd last row/column is dropped), idx (uint8, out's shape) = the window position
    0..3 (row-major) of the maximum, the first on ties.
    Grid: (T * C,).
    """
    pid = tl.program_id(0)
    t = pid // C
    c = pid % C
    M = N * H * W
    lanes = tl.arange(0, BLOCK)
    # Shift: the mean of the first block (keeps the one-pass variance free of cancellation).
    off, n, h, w = _elem_offsets(lanes, t, c, N, C, H, W)
    m = lanes < M
    zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
    K = tl.sum(zv, axis=0) / tl.sum(tl.where(m, 1.0, 0.0).to(ACC), axis=0)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        e = start + lanes
        m = e < M
        off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
        d = tl.where(m, tl.load(z_ptr + off, mask=m, other=0.0).to(ACC) - K, 0.0)
        s1 += d
        s2 += d * d
    Mf = tl.full([], Mtot, ACC)
    dm = tl.sum(s1, axis=0) / Mf
    var = tl.maximum(tl.sum(s2, axis=0) / Mf - dm * dm, 0.0)
    mean = K + dm
    rstd = 1.0 / tl.sqrt(var + tl.full([], eps, ACC))
    tl.store(mean_ptr + pid, mean.to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + pid, rstd.to(rstd_ptr.dtype.element_ty))

    g = _load_tc(g_ptr, t, c, sg_t, sg_c, ACC)
    b = _load_tc(b_ptr, t, c, sb_t, sb_c, ACC)
    sl = tl.full([], slope, ACC)
    if POOL == 0:
        for start in range(0, M, BLOCK):
            e = start + lanes
            m = e < M
            off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
            zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
            xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
            tl.store(out_ptr + off, (a * act).to(out_ptr.dtype.element_ty), mask=m)
    else:
        HWo = Ho * Wo
        Mo = N * HWo
        for start in range(0, Mo, BLOCK):
            eo = start + lanes
            m = eo < Mo
            n = eo // HWo
            r = eo % HWo
            ho = r // Wo
            wo = r % Wo
            ioff = _row_addr(t, c, n, N, C, H * W) + (2 * ho) * W + 2 * wo
            z0 = tl.load(z_ptr + ioff, mask=m, other=0.0).to(ACC)
            z1 = tl.load(z_ptr + ioff + 1, mask=m, other=0.0).to(ACC)
            z2 = tl.load(z_ptr + ioff + W, mask=m, other=0.0).to(ACC)
            z3 = tl.load(z_ptr + ioff + W + 1, mask=m, other=0.0).to(ACC)
            xh0, a0, act0 = _bn_act(z0, mean, rstd, g, b, sl)
            xh1, a1, act1 = _bn_act(z1, mean, rstd, g, b, sl)
            xh2, a2, act2 = _bn_act(z2, mean, rstd, g, b, sl)
            xh3, a3, act3 = _bn_act(z3, mean, rstd, g, b, sl)
            best = a0 * act0
            bi = tl.zeros([BLOCK], dtype=tl.int32)
            h1 = a1 * act1
            bi = tl.where(h1 > best, 1, bi)
            best = tl.where(h1 > best, h1, best)
            h2 = a2 * act2
            bi = tl.where(h2 > best, 2, bi)
            best = tl.where(h2 > best, h2, best)
            h3 = a3 * act3
            bi = tl.where(h3 > best, 3, bi)
            best = tl.where(h3 > best, h3, best)
            ooff = _row_addr(t, c, n, N, C, HWo) + r
            tl.store(out_ptr + ooff, best.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(idx_ptr + ooff, bi.to(tl.uint8), mask=m)


@triton.jit
def _bn_bwd_kernel(
    dout_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, idx_ptr, dz_ptr, dg_ptr, db_ptr,
    sm_t, sm_c, sr_t, sr_c, sg_t, sg_c, sb_t, sb_c,
    slope: "fp64", Mtot: "fp64",
    N, C, H, W, Ho, Wo,
    POOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backward of the fused BatchNorm + activation + max-pool for one (task t, channel c).

    dout: out's shape; z [T, N, C, H, W]; mean, rstd, gamma, beta [T, C] (strided); idx as the forward's.
    da = (dh/da) * (POOL 2: dout routed to each window's argmax, 0 elsewhere; POOL 0: dout),
    xh = (z - mean) rstd. Reduction pass: dbeta = sum da, dgamma = sum da xh (over N, H, W).
    Elementwise pass: dz = rstd (gamma da - gamma dbeta / M - xh gamma dgamma / M).
    dz [T, N, C, H, W]; dgamma, dbeta [T, C] contiguous. Grid: (T * C,).
    """
    pid = tl.program_id(0)
    t = pid // C
    c = pid % C
    M = N * H * W
    lanes = tl.arange(0, BLOCK)
    mean = _load_tc(mean_ptr, t, c, sm_t, sm_c, ACC)
    rstd = _load_tc(rstd_ptr, t, c, sr_t, sr_c, ACC)
    g = _load_tc(g_ptr, t, c, sg_t, sg_c, ACC)
    b = _load_tc(b_ptr, t, c, sb_t, sb_c, ACC)
    sl = tl.full([], slope, ACC)
    s_da = tl.zeros([BLOCK], dtype=ACC)
    s_dax = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        e = start + lanes
        m = e < M
        off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
        zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
        da = _window_grad(dout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
        s_da += da
        s_dax += da * xh
    dbeta = tl.sum(s_da, axis=0)
    dgamma = tl.sum(s_dax, axis=0)
    tl.store(dg_ptr + pid, dgamma.to(dg_ptr.dtype.element_ty))
    tl.store(db_ptr + pid, dbeta.to(db_ptr.dtype.element_ty))
    Mf = tl.full([], Mtot, ACC)
    c1 = g * dbeta / Mf
    c2 = g * dgamma / Mf
    for start in range(0, M, BLOCK):
        e = start + lanes
        m = e < M
        off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
        zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
        da = _window_grad(dout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
        dz = rstd * (g * da - c1 - xh * c2)
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m)




# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _bn_config(M: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) of a (task, channel) program over M elements."""
    block = _pow2_block(M, _BN_MIN_BLOCK, _BN_MAX_BLOCK)
    return block, max(1, min(8, block // 256))



def _pooled_hw(H: int, W: int, pool: int) -> Tuple[int, int]:
    if pool == 0:
        return H, W
    if pool != 2:
        raise ValueError(f"pool must be 0 or 2, got {pool}")
    return H // 2, W // 2


def bn_act_pool_forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float,
                        pool: int) -> Tuple[Tensor, Tensor, Tensor, Opt]:
    """(out, mean [T, C], rstd [T, C], idx or None); see :func:`_bn_fwd_kernel`."""
    z = z.contiguous()
    T, N, C, H, W = z.shape
    Ho, Wo = _pooled_hw(H, W, pool)
    mean = torch.empty(T, C, dtype=z.dtype, device=z.device)
    rstd = torch.empty(T, C, dtype=z.dtype, device=z.device)
    if pool == 0:
        out, idx = torch.empty_like(z), None
    else:
        out = torch.empty(T, N, C, Ho, Wo, dtype=z.dtype, device=z.device)
        idx = torch.empty(T, N, C, Ho, Wo, dtype=torch.uint8, device=z.device)
    if T * C == 0 or N * H * W == 0:
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan")), idx
    acc, _ = _acc(z.dtype)
    block, warps = _bn_config(max(N * H * W, N * Ho * Wo))
    _bn_fwd_kernel[(T * C,)](
        z, gamma, beta, out, mean, rstd, out if idx is None else idx,
        *_s(gamma), *_s(beta), float(eps), float(slope), float(N * H * W), N, C, H, W, Ho, Wo,
        POOL=pool, ACC=acc, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out, mean, rstd, idx


def bn_act_pool_backward(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt,
                         slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dz [T, N, C, H, W], dgamma [T, C], dbeta [T, C]); see :func:`_bn_bwd_kernel`."""
    z = z.contiguous()
    dout = dout.contiguous()
    T, N, C, H, W = z.shape
    Ho, Wo = _pooled_hw(H, W, pool)
    idx_arg = dout if pool == 0 else idx.contiguous()
    dz = torch.empty_like(z)
    dgamma = torch.empty(T, C, dtype=z.dtype, device=z.device)
    dbeta = torch.empty(T, C, dtype=z.dtype, device=z.device)
    if T * C == 0 or N * H * W == 0:
        return dz, dgamma.zero_(), dbeta.zero_()
    acc, _ = _acc(z.dtype)
    block, warps = _bn_config(N * H * W)
    _bn_bwd_kernel[(T * C,)](
        dout, z, mean, rstd, gamma, beta, idx_arg, dz, dgamma, dbeta,
        *_s(mean), *_s(rstd), *_s(gamma), *_s(beta), float(slope), float(N * H * W), N, C, H, W, Ho, Wo,
        POOL=pool, ACC=acc, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return dz, dgamma, dbeta


