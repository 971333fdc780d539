"""Triton kernels of the fused BatchNorm + activation + 2x2 max-pool block: the R-passes (the
R-operator of the forward and of the backward, for Hessian-vector products). Device helpers, launch
configuration and the shapes: :mod:`.batchnorm`; math: ``docs/design.md`` (the BatchNorm block's
four passes).

  R-forward   R{out} [T, N, C, Ho, Wo], rmean and q [T, C] along (rz, ugamma, ubeta)
  R-backward  R{dz} [T, N, C, H, W], R{dgamma}, R{dbeta} [T, C] along (rdout, rz, ugamma)

The R-forward walks the pooled outputs (the input at the stored argmax of each window); the
R-backward walks the inputs and picks up the window's gradient where the window's argmax is that
input. Any of rz, ugamma, ubeta, rdout may be None (a zero direction: the kernel skips its terms).
"""

from typing import Tuple

import torch
from torch import Tensor

from .batchnorm import _bn_act, _bn_config, _elem_offsets, _load_tc, _pooled_hw, _row_addr, _window_grad
from .common import Opt, _acc, _s, tl, triton


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
# Host side
# ---------------------------------------------------------------------------------------------


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
