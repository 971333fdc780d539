"""Triton kernels of the task-batched layers; semantics: :mod:`fastmaml.layers.reference`.

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

Importing this module raises ``ImportError`` when triton is not installed.
"""

import functools
from typing import Optional, Tuple

try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or an install that cannot be imported
    raise ImportError(f"fastmaml.triton.layers needs triton: {exc}") from exc

import torch
from torch import Tensor

Opt = Optional[Tensor]

__all__ = [
    "bn_act_pool_forward",
    "bn_act_pool_backward",
    "bn_act_pool_rforward",
    "bn_act_pool_rbackward",
    "conv2d_cin1_forward",
    "conv2d_cin1_weight_grad",
]

# Launch configuration (module-level so that tests can shrink it to exercise loops and tails).
_BN_MAX_BLOCK = 1024  # elements per loop iteration of a (task, channel) program (a power of two)
_BN_MIN_BLOCK = 32
_CONV_PIX_BLOCK = 64  # output pixels per conv program (a power of two)
_CONV_PROGRAMS_PER_SM = 4  # weight grad: split each image's pixels until about this many programs per SM
_CONV_SPLIT: Optional[int] = None  # weight grad: force this many pixel chunks per image (tests); None: automatic


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


@triton.jit
def _bn_rfwd_kernel(
    rz_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, ug_ptr, ub_ptr, idx_ptr, rout_ptr, rmean_ptr, q_ptr,
    sm_t, sm_c, sr_t, sr_c, sg_t, sg_c, sb_t, sb_c, sug_t, sug_c, sub_t, sub_c,
    slope: "fp64", Mtot: "fp64",
    N, C, H, W, Ho, Wo,
    HAS_RZ: tl.constexpr, HAS_UG: tl.constexpr, HAS_UB: tl.constexpr,
    POOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """R-forward of the fused BatchNorm + activation + max-pool for one (task t, channel c).

    rz, z [T, N, C, H, W]; mean, rstd, gamma, beta, u_gamma, u_beta [T, C] (strided); idx as the
    forward's. xh = (z - mean) rstd, a = gamma xh + beta. Reduction pass (HAS_RZ; else both 0):
    rmean = sum R{z} / M, q = sum xh R{z} / M (stored [T, C] contiguous). Elementwise pass:
    R{xh} = (R{z} - rmean - xh q) rstd, R{a} = gamma R{xh} + u_gamma xh + u_beta (absent terms
    dropped), R{h} = (dh/da) R{a}; POOL 0: rout = R{h}; POOL 2: rout [T, N, C, H//2, W//2] = R{h} at
    each window's stored argmax. Grid: (T * C,).
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
    rmean = tl.zeros([], dtype=ACC)
    q = tl.zeros([], dtype=ACC)
    if HAS_RZ:
        s_r = tl.zeros([BLOCK], dtype=ACC)
        s_rx = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, M, BLOCK):
            e = start + lanes
            m = e < M
            off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
            zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
            rz = tl.load(rz_ptr + off, mask=m, other=0.0).to(ACC)
            s_r += rz
            s_rx += ((zv - mean) * rstd) * rz
        Mf = tl.full([], Mtot, ACC)
        rmean = tl.sum(s_r, axis=0) / Mf
        q = tl.sum(s_rx, axis=0) / Mf
    tl.store(rmean_ptr + pid, rmean.to(rmean_ptr.dtype.element_ty))
    tl.store(q_ptr + pid, q.to(q_ptr.dtype.element_ty))
    ug = tl.zeros([], dtype=ACC)
    ub = tl.zeros([], dtype=ACC)
    if HAS_UG:
        ug = _load_tc(ug_ptr, t, c, sug_t, sug_c, ACC)
    if HAS_UB:
        ub = _load_tc(ub_ptr, t, c, sub_t, sub_c, ACC)
    if POOL == 0:
        Mo = M
    else:
        Mo = N * Ho * Wo
    HWo = Ho * Wo
    for start in range(0, Mo, BLOCK):
        e = start + lanes
        m = e < Mo
        if POOL == 0:
            off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
            ooff = off
        else:
            n = e // HWo
            r = e % HWo
            ho = r // Wo
            wo = r % Wo
            ooff = _row_addr(t, c, n, N, C, HWo) + r
            p = tl.load(idx_ptr + ooff, mask=m, other=0).to(tl.int32)
            off = _row_addr(t, c, n, N, C, H * W) + (2 * ho + p // 2) * W + 2 * wo + p % 2
        zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
        ra = tl.zeros([BLOCK], dtype=ACC)
        if HAS_RZ:
            rz = tl.load(rz_ptr + off, mask=m, other=0.0).to(ACC)
            ra = g * ((rz - rmean - xh * q) * rstd)
        if HAS_UG:
            ra = ra + ug * xh
        if HAS_UB:
            ra = ra + ub
        tl.store(rout_ptr + ooff, (ra * act).to(rout_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_rbwd_kernel(
    dout_ptr, rdout_ptr, z_ptr, rz_ptr, mean_ptr, rstd_ptr, rmean_ptr, q_ptr, g_ptr, b_ptr, ug_ptr, idx_ptr,
    rdz_ptr, rdg_ptr, rdb_ptr,
    sm_t, sm_c, sr_t, sr_c, srm_t, srm_c, sq_t, sq_c, sg_t, sg_c, sb_t, sb_c, sug_t, sug_c,
    slope: "fp64", Mtot: "fp64",
    N, C, H, W, Ho, Wo,
    HAS_RDOUT: tl.constexpr, HAS_RZ: tl.constexpr, HAS_UG: tl.constexpr,
    POOL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """R-backward of the fused BatchNorm + activation + max-pool for one (task t, channel c).

    dout, rdout: out's shape; z, rz [T, N, C, H, W]; mean, rstd, rmean, q, gamma, beta, u_gamma [T, C]
    (strided); idx as the forward's. da and R{da} are dout and R{dout} routed through the pool and
    multiplied by dh/da; xh = (z - mean) rstd; R{xh} = (R{z} - rmean - xh q) rstd (R{z} = 0 when
    absent). Reduction pass, over (N, H, W):
    S1 = sum da, S2 = sum da xh, S3 = sum R{da}, S4 = sum R{da} xh, S5 = sum da R{xh}.
    R{dgamma} = S4 + S5, R{dbeta} = S3 ([T, C] contiguous). Elementwise pass, with dxh = gamma da,
    R{dxh} = gamma R{da} + u_gamma da, mu2 = gamma S2 / M, mean R{dxh} = (gamma S3 + u_gamma S1) / M,
    mean(R{dxh} xh + dxh R{xh}) = (gamma S4 + u_gamma S2 + gamma S5) / M =: nu:
    dz = rstd (dxh - gamma S1 / M - xh mu2),
    R{dz} = -q rstd dz + rstd (R{dxh} - mean R{dxh} - R{xh} mu2 - xh nu)   [T, N, C, H, W].
    Grid: (T * C,).
    """
    pid = tl.program_id(0)
    t = pid // C
    c = pid % C
    M = N * H * W
    lanes = tl.arange(0, BLOCK)
    mean = _load_tc(mean_ptr, t, c, sm_t, sm_c, ACC)
    rstd = _load_tc(rstd_ptr, t, c, sr_t, sr_c, ACC)
    rmean = _load_tc(rmean_ptr, t, c, srm_t, srm_c, ACC)
    q = _load_tc(q_ptr, t, c, sq_t, sq_c, ACC)
    g = _load_tc(g_ptr, t, c, sg_t, sg_c, ACC)
    b = _load_tc(b_ptr, t, c, sb_t, sb_c, ACC)
    ug = tl.zeros([], dtype=ACC)
    if HAS_UG:
        ug = _load_tc(ug_ptr, t, c, sug_t, sug_c, ACC)
    sl = tl.full([], slope, ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    s3 = tl.zeros([BLOCK], dtype=ACC)
    s4 = tl.zeros([BLOCK], dtype=ACC)
    s5 = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        e = start + lanes
        m = e < M
        off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
        zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
        da = _window_grad(dout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
        if HAS_RZ:
            rz = tl.load(rz_ptr + off, mask=m, other=0.0).to(ACC)
            rxh = (rz - rmean - xh * q) * rstd
        else:
            rxh = (-rmean - xh * q) * rstd
        s1 += da
        s2 += da * xh
        s5 += tl.where(m, da * rxh, 0.0)
        if HAS_RDOUT:
            rda = _window_grad(rdout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
            s3 += rda
            s4 += rda * xh
    S1 = tl.sum(s1, axis=0)
    S2 = tl.sum(s2, axis=0)
    S3 = tl.sum(s3, axis=0)
    S4 = tl.sum(s4, axis=0)
    S5 = tl.sum(s5, axis=0)
    tl.store(rdg_ptr + pid, (S4 + S5).to(rdg_ptr.dtype.element_ty))
    tl.store(rdb_ptr + pid, S3.to(rdb_ptr.dtype.element_ty))
    Mf = tl.full([], Mtot, ACC)
    c1 = g * S1 / Mf
    mu2 = g * S2 / Mf
    mean_rdxh = (g * S3 + ug * S1) / Mf
    nu = (g * S4 + ug * S2 + g * S5) / Mf
    qr = q * rstd
    for start in range(0, M, BLOCK):
        e = start + lanes
        m = e < M
        off, n, h, w = _elem_offsets(e, t, c, N, C, H, W)
        zv = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
        xh, a, act = _bn_act(zv, mean, rstd, g, b, sl)
        da = _window_grad(dout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
        if HAS_RZ:
            rz = tl.load(rz_ptr + off, mask=m, other=0.0).to(ACC)
            rxh = (rz - rmean - xh * q) * rstd
        else:
            rxh = (-rmean - xh * q) * rstd
        dz = rstd * (g * da - c1 - xh * mu2)
        rdxh = ug * da
        if HAS_RDOUT:
            rda = _window_grad(rdout_ptr, idx_ptr, t, c, n, h, w, m, N, C, Ho, Wo, POOL, off, ACC) * act
            rdxh = g * rda + rdxh
        rdz = -qr * dz + rstd * (rdxh - mean_rdxh - rxh * mu2 - xh * nu)
        tl.store(rdz_ptr + off, rdz.to(rdz_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# One-input-channel convolution: kernels
# ---------------------------------------------------------------------------------------------


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


def _acc(dtype: torch.dtype):
    """(triton, torch) accumulation dtype: float64 for float64, else float32."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _bn_config(M: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) of a (task, channel) program over M elements."""
    block = _pow2_block(M, _BN_MIN_BLOCK, _BN_MAX_BLOCK)
    return block, max(1, min(8, block // 256))


def _s(t: Tensor) -> Tuple[int, int]:
    """Strides of a [T, C] tensor (0 for an expanded axis)."""
    return t.stride(0), t.stride(1)


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


def bn_act_pool_rforward(rz: Opt, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt,
                         ubeta: Opt, idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{out}, rmean [T, C], q [T, C]); see :func:`_bn_rfwd_kernel`."""
    z = z.contiguous()
    T, N, C, H, W = z.shape
    Ho, Wo = _pooled_hw(H, W, pool)
    rz_arg = z if rz is None else rz.contiguous()
    ug_arg = gamma if ugamma is None else ugamma
    ub_arg = beta if ubeta is None else ubeta
    idx_arg = z if pool == 0 else idx.contiguous()
    rout = torch.empty(T, N, C, Ho, Wo, dtype=z.dtype, device=z.device)
    rmean = torch.empty(T, C, dtype=z.dtype, device=z.device)
    q = torch.empty(T, C, dtype=z.dtype, device=z.device)
    if T * C == 0 or N * H * W == 0:
        return rout.zero_(), rmean.zero_(), q.zero_()
    acc, _ = _acc(z.dtype)
    block, warps = _bn_config(N * H * W)
    _bn_rfwd_kernel[(T * C,)](
        rz_arg, z, mean, rstd, gamma, beta, ug_arg, ub_arg, idx_arg, rout, rmean, q,
        *_s(mean), *_s(rstd), *_s(gamma), *_s(beta), *_s(ug_arg), *_s(ub_arg),
        float(slope), float(N * H * W), N, C, H, W, Ho, Wo,
        HAS_RZ=rz is not None, HAS_UG=ugamma is not None, HAS_UB=ubeta is not None,
        POOL=pool, ACC=acc, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return rout, rmean, q


def bn_act_pool_rbackward(dout: Tensor, rdout: Opt, z: Tensor, rz: Opt, mean: Tensor, rstd: Tensor, rmean: Tensor,
                          q: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt, idx: Opt, slope: float,
                          pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{dz}, R{dgamma}, R{dbeta}); see :func:`_bn_rbwd_kernel`."""
    z = z.contiguous()
    dout = dout.contiguous()
    T, N, C, H, W = z.shape
    Ho, Wo = _pooled_hw(H, W, pool)
    rdout_arg = dout if rdout is None else rdout.contiguous()
    rz_arg = z if rz is None else rz.contiguous()
    ug_arg = gamma if ugamma is None else ugamma
    idx_arg = dout if pool == 0 else idx.contiguous()
    rdz = torch.empty_like(z)
    rdgamma = torch.empty(T, C, dtype=z.dtype, device=z.device)
    rdbeta = torch.empty(T, C, dtype=z.dtype, device=z.device)
    if T * C == 0 or N * H * W == 0:
        return rdz, rdgamma.zero_(), rdbeta.zero_()
    acc, _ = _acc(z.dtype)
    block, warps = _bn_config(N * H * W)
    _bn_rbwd_kernel[(T * C,)](
        dout, rdout_arg, z, rz_arg, mean, rstd, rmean, q, gamma, beta, ug_arg, idx_arg, rdz, rdgamma, rdbeta,
        *_s(mean), *_s(rstd), *_s(rmean), *_s(q), *_s(gamma), *_s(beta), *_s(ug_arg),
        float(slope), float(N * H * W), N, C, H, W, Ho, Wo,
        HAS_RDOUT=rdout is not None, HAS_RZ=rz is not None, HAS_UG=ugamma is not None,
        POOL=pool, ACC=acc, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return rdz, rdgamma, rdbeta


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
