"""The BatchNorm block: BatchNorm (per-task batch statistics) + activation + 2x2 max-pool, fused.

    z [T, N, C, H, W] (BatchNorm1d: H = W = 1); statistics per (t, c) over (N, H, W), M elements:
    m = mean z, s = sqrt(var z + eps) (biased var), rstd = 1 / s, xh = (z - m) rstd
    a = gamma xh + beta,  h = a if a > 0 else slope a,  out = maxpool2x2(h)  (or h when pool = 0)

``slope``: 0 for ReLU, the negative slope for LeakyReLU, 1 for no activation. ``pool``: 0 (none)
or 2 (see :mod:`.pooling`; ``idx`` uint8, out's shape, the argmax 0..3 of each window). gamma, beta
[T, C] (a shared parameter is passed expanded; without affine parameters gamma = 1, beta = 0 and no
gradients are asked for). With h' = dh/da (1 or slope) and dxh = gamma da:

* forward:    (out, mean [T, C], rstd [T, C], idx)
* backward:   da = h' scatter(dout), dgamma = sum da xh, dbeta = sum da,
              dz = rstd (dxh - mean dxh - xh mean(dxh xh))
* R-forward:  R{m} = mean R{z}, q = mean(xh R{z}) (so R{s} = q), R{xh} = (R{z} - R{m} - xh q) rstd,
              R{a} = gamma R{xh} + u_gamma xh + u_beta, R{out} = gather(h' R{a})  -> (R{out}, R{m}, q)
* R-backward: R{da} = h' scatter(R{dout}), R{dxh} = gamma R{da} + u_gamma da, mu2 = mean(dxh xh),
              R{dz} = -q rstd dz + rstd (R{dxh} - mean R{dxh} - R{xh} mu2 - xh mean(R{dxh} xh + dxh R{xh})),
              R{dgamma} = sum(R{da} xh + da R{xh}), R{dbeta} = sum R{da}

Kernels (the four ``bn_act_pool_*``; see :func:`family_kernels`): torch (below), cpp
(``torch.ops.fastmaml.bn_act_pool_*``, csrc), triton (``fastmaml.triton.layers``).

Per-step BatchNorm (MAML++'s BNWB, :class:`fastmaml.models.PerStepBatchNorm`, a block with
``steps = S``): gamma, beta are row s = min(step, S - 1) of its [S, C] weight and bias ([T, S, C]
in the runner's parameters); its gradients and HVP terms land in row s only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..kernels import extension
from ..step_context import weight_set
from .activation import act_slope
from .node import PassContext, Saved
from .pooling import pool_forward, pool_gather, pool_scatter
from .tensors import Opt, to5

KERNELS = ("bn_act_pool_forward", "bn_act_pool_backward", "bn_act_pool_rforward", "bn_act_pool_rbackward")


# -- torch implementation ----------------------------------------------------------------------

def _stats_view(t: Tensor) -> Tensor:
    return t[:, None, :, None, None]


def _xh(z: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return (z - _stats_view(mean)) * _stats_view(rstd)


def bn_act_pool_forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float,
                        pool: int) -> Tuple[Tensor, Tensor, Tensor, Opt]:
    """(out, mean [T, C], rstd [T, C], idx or None)."""
    mean = z.mean(dim=(1, 3, 4))
    var = (z - _stats_view(mean)).pow(2).mean(dim=(1, 3, 4))
    rstd = (var + eps).rsqrt()
    a = _stats_view(gamma) * _xh(z, mean, rstd) + _stats_view(beta)
    h = a * act_slope(a, slope)
    out, idx = pool_forward(h, pool)
    return out, mean, rstd, idx


def _da(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt, slope: float,
        pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dL/da, xh, dh/da)."""
    xh = _xh(z, mean, rstd)
    act = act_slope(_stats_view(gamma) * xh + _stats_view(beta), slope)
    dh = pool_scatter(dout, idx, pool, z.shape[3], z.shape[4])
    return dh * act, xh, act


def _bn_dz(da: Tensor, xh: Tensor, rstd: Tensor, gamma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dz, dgamma, dbeta) from dL/da: dxh = gamma da, dz = rstd (dxh - mean dxh - xh mean(dxh xh))."""
    dgamma = (da * xh).sum(dim=(1, 3, 4))
    dbeta = da.sum(dim=(1, 3, 4))
    M = da.numel() // (da.shape[0] * da.shape[2])
    dxh = da * _stats_view(gamma)
    dz = _stats_view(rstd) * (dxh - _stats_view(gamma * dbeta / M) - xh * _stats_view(gamma * dgamma / M))
    return dz, dgamma, dbeta


def bn_act_pool_backward(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, idx: Opt,
                         slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dz [T, N, C, H, W], dgamma [T, C], dbeta [T, C])."""
    da, xh, _ = _da(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    return _bn_dz(da, xh, rstd, gamma)


def bn_act_pool_rforward(rz: Opt, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt,
                         ubeta: Opt, idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{out}, rmean [T, C], q [T, C]):  R{m} = mean R{z}, q = mean(xh R{z}) (so R{s} = q),
    R{xh} = (R{z} - R{m} - xh q) rstd, R{a} = gamma R{xh} + u_gamma xh + u_beta, R{h} = (dh/da) R{a}."""
    xh = _xh(z, mean, rstd)
    a = _stats_view(gamma) * xh + _stats_view(beta)
    if rz is None:
        rz = torch.zeros_like(z)
    rmean = rz.mean(dim=(1, 3, 4))
    q = (xh * rz).mean(dim=(1, 3, 4))
    rxh = (rz - _stats_view(rmean) - xh * _stats_view(q)) * _stats_view(rstd)
    ra = _stats_view(gamma) * rxh
    if ugamma is not None:
        ra = ra + _stats_view(ugamma) * xh
    if ubeta is not None:
        ra = ra + _stats_view(ubeta)
    rh = ra * act_slope(a, slope)
    return pool_gather(rh, idx, pool), rmean, q


def bn_act_pool_rbackward(dout: Tensor, rdout: Opt, z: Tensor, rz: Opt, mean: Tensor, rstd: Tensor, rmean: Tensor,
                          q: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt, idx: Opt, slope: float,
                          pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(R{dz}, R{dgamma}, R{dbeta}). With dxh = gamma da and mu1 = mean dxh, mu2 = mean(dxh xh):
    R{dz} = -q rstd dz + rstd (R{dxh} - mean R{dxh} - R{xh} mu2 - xh mean(R{dxh} xh + dxh R{xh})),
    R{dxh} = gamma R{da} + u_gamma da, R{dgamma} = sum(R{da} xh + da R{xh}), R{dbeta} = sum R{da}."""
    da, xh, act = _da(dout, z, mean, rstd, gamma, beta, idx, slope, pool)
    dz, _, _ = _bn_dz(da, xh, rstd, gamma)
    if rz is None:
        rz = torch.zeros_like(z)
    rxh = (rz - _stats_view(rmean) - xh * _stats_view(q)) * _stats_view(rstd)
    rda = torch.zeros_like(da) if rdout is None else pool_scatter(rdout, idx, pool, z.shape[3], z.shape[4]) * act
    g = _stats_view(gamma)
    dxh = g * da
    rdxh = g * rda if ugamma is None else g * rda + _stats_view(ugamma) * da
    dims = (1, 3, 4)
    mu2 = (dxh * xh).mean(dim=dims, keepdim=True)
    rdz = -_stats_view(q * rstd) * dz + _stats_view(rstd) * (
        rdxh - rdxh.mean(dim=dims, keepdim=True) - rxh * mu2 - xh * (rdxh * xh + dxh * rxh).mean(dim=dims, keepdim=True))
    rdgamma = (rda * xh + da * rxh).sum(dim=dims)
    rdbeta = rda.sum(dim=dims)
    return rdz, rdgamma, rdbeta


# -- C++ ops (csrc; schemas there, fake kernels here) ------------------------------------------

def _pooled(z, pool):
    T, N, C, H, W = z.shape
    return (T, N, C, H // 2, W // 2) if pool == 2 else (T, N, C, H, W)


def _fake_forward(z, gamma, beta, eps, slope, pool):
    T, C = z.shape[0], z.shape[2]
    idx = z.new_empty(_pooled(z, pool) if pool == 2 else (0,), dtype=torch.uint8)
    return z.new_empty(_pooled(z, pool)), z.new_empty((T, C)), z.new_empty((T, C)), idx


def _fake_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool):
    T, C = z.shape[0], z.shape[2]
    return torch.empty_like(z), z.new_empty((T, C)), z.new_empty((T, C))


def _fake_rforward(rz, z, mean, rstd, gamma, beta, ugamma, ubeta, idx, slope, pool):
    T, C = z.shape[0], z.shape[2]
    return z.new_empty(_pooled(z, pool)), z.new_empty((T, C)), z.new_empty((T, C))


def _fake_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ugamma, idx, slope, pool):
    T, C = z.shape[0], z.shape[2]
    return torch.empty_like(z), z.new_empty((T, C)), z.new_empty((T, C))


# op name in torch.ops.fastmaml -> its fake kernel (torch.library.opcheck, tracing)
CPP_OPS: Dict[str, Callable] = {"bn_act_pool_forward": _fake_forward, "bn_act_pool_backward": _fake_backward,
                                "bn_act_pool_rforward": _fake_rforward, "bn_act_pool_rbackward": _fake_rbackward}


def _cpp_ops():
    return extension.ops("fastmaml", tuple(CPP_OPS))


def cpp_bn_act_pool_forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float, slope: float,
                            pool: int) -> Tuple[Tensor, Tensor, Tensor, Opt]:
    out, mean, rstd, idx = _cpp_ops().bn_act_pool_forward(z, gamma, beta, float(eps), float(slope), int(pool))
    return out, mean, rstd, (idx if pool == 2 else None)


def cpp_bn_act_pool_backward(dout: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor,
                             idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _cpp_ops().bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, float(slope), int(pool))


def cpp_bn_act_pool_rforward(rz: Opt, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor,
                             ugamma: Opt, ubeta: Opt, idx: Opt, slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _cpp_ops().bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ugamma, ubeta, idx, float(slope),
                                           int(pool))


def cpp_bn_act_pool_rbackward(dout: Tensor, rdout: Opt, z: Tensor, rz: Opt, mean: Tensor, rstd: Tensor,
                              rmean: Tensor, q: Tensor, gamma: Tensor, beta: Tensor, ugamma: Opt, idx: Opt,
                              slope: float, pool: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _cpp_ops().bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ugamma, idx,
                                            float(slope), int(pool))


# -- backend choice ----------------------------------------------------------------------------

_TORCH = {"bn_act_pool_forward": bn_act_pool_forward, "bn_act_pool_backward": bn_act_pool_backward,
          "bn_act_pool_rforward": bn_act_pool_rforward, "bn_act_pool_rbackward": bn_act_pool_rbackward}


def family_kernels(backend: str, triton_layers=None) -> Dict[str, Callable]:
    """name -> implementation of the block's four kernels on a concrete layer backend: 'torch',
    'cpp' (the caller probes the C++ ops) or 'triton' (``triton_layers``: the imported
    ``fastmaml.triton.layers``; a kernel it lacks runs on torch)."""
    if backend == "cpp":
        return {"bn_act_pool_forward": cpp_bn_act_pool_forward, "bn_act_pool_backward": cpp_bn_act_pool_backward,
                "bn_act_pool_rforward": cpp_bn_act_pool_rforward,
                "bn_act_pool_rbackward": cpp_bn_act_pool_rbackward}
    if backend == "triton":
        return {fn: getattr(triton_layers, fn, impl) for fn, impl in _TORCH.items()}
    return dict(_TORCH)


# -- runner node -------------------------------------------------------------------------------

@dataclass
class BatchNormSaved(Saved):
    z: Optional[Tensor] = None          # the input as [T, N, C, H, W]
    shape: Optional[torch.Size] = None  # the input's own shape
    mean: Optional[Tensor] = None       # [T, C]
    rstd: Optional[Tensor] = None       # [T, C]
    idx: Optional[Tensor] = None        # pool argmax (None without a pool)
    gamma: Optional[Tensor] = None      # [T, C], the step's row for per-step blocks
    beta: Optional[Tensor] = None
    dout: Optional[Tensor] = None       # d as the block's output layout (backward)
    rz: Optional[Tensor] = None         # R{z} (R-forward; None: zero)
    rmean: Optional[Tensor] = None      # R{m} [T, C] (None: nothing moved up to this block)
    q: Optional[Tensor] = None          # mean(xh R{z}) [T, C]


@dataclass(frozen=True)
class BatchNormBlock:
    weight: Optional[str]  # None: BatchNorm without affine parameters
    bias: Optional[str]
    eps: float
    slope: float  # 0: ReLU, a LeakyReLU's negative slope, 1: no activation
    pool: int     # 0: none, 2: MaxPool2d(2)
    steps: int = 0  # 0: one weight set [C]; S >= 1: PerStepBatchNorm, weight/bias [S, C], row per step

    def row(self, step: Optional[int]) -> Optional[int]:
        """The weight set a per-step BatchNorm block uses at ``step``: min(step, S - 1); None for an
        ordinary block. The rule is :func:`fastmaml.step_context.weight_set`, shared with ``PerStepBatchNorm``."""
        if not self.steps:
            return None
        return weight_set(step, self.steps, "the fused path's per-step BatchNorm",
                          "pass step= (the engine passes fastmaml.step_context.current_step())")

    def affine(self, params: Dict[str, Tensor], z: Tensor, row: Optional[int]) -> Tuple[Tensor, Tensor]:
        """gamma, beta [T, C] of the block (row ``row`` of [T, S, C] for per-step ones)."""
        if self.weight is None:
            T, C = z.shape[0], z.shape[2]
            return (torch.ones(T, C, dtype=z.dtype, device=z.device), torch.zeros(T, C, dtype=z.dtype, device=z.device))
        gamma, beta = params[self.weight], params[self.bias]
        if row is not None:
            gamma, beta = gamma[:, row], beta[:, row]
        return gamma.contiguous(), beta.contiguous()

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        z = to5(h)
        gamma, beta = self.affine(ctx.params, z, self.row(ctx.step))
        out, mean, rstd, idx = ctx.kernels.bn_act_pool_forward(z, gamma, beta, self.eps, self.slope, self.pool)
        s = BatchNormSaved(z=z, shape=h.shape, mean=mean, rstd=rstd, idx=idx, gamma=gamma, beta=beta) if save else None
        return (out if self.pool else out.view(h.shape)), s

    def backward(self, ctx: PassContext, s: BatchNormSaved, d: Tensor, need_dx: bool) -> Tensor:
        dout = d if self.pool else to5(d)
        dz, dgamma, dbeta = ctx.kernels.bn_act_pool_backward(dout, s.z, s.mean, s.rstd, s.gamma, s.beta, s.idx,
                                                             slope=self.slope, pool=self.pool)
        s.dout = dout
        # put decides per parameter: a frozen scale (requires_grad=False) may sit beside a learned shift
        row = self.row(ctx.step)
        ctx.put(self.weight, dgamma, row)
        ctx.put(self.bias, dbeta, row)
        return dz.view(s.shape)

    def _direction(self, ctx: PassContext) -> Tuple[Opt, Opt]:
        """(u_gamma, u_beta) [T, C] of the direction: the row this step used for per-step blocks."""
        ug = ctx.direction.get(self.weight) if self.weight else None
        ub = ctx.direction.get(self.bias) if self.bias else None
        row = self.row(ctx.step)
        if row is not None:
            ug = None if ug is None else ug[:, row]
            ub = None if ub is None else ub[:, row]
        return ug, ub

    def rforward(self, ctx: PassContext, s: BatchNormSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        rz = None if r is None else to5(r).contiguous()
        ug, ub = self._direction(ctx)
        if rz is None and ug is None and ub is None:
            s.rz = s.rmean = s.q = None
            return None
        rout, rmean, q = ctx.kernels.bn_act_pool_rforward(rz, s.z, s.mean, s.rstd, s.gamma, s.beta, ug, ub, s.idx,
                                                          slope=self.slope, pool=self.pool)
        s.rz, s.rmean, s.q = rz, rmean, q
        return rout if self.pool else rout.view(s.shape)

    def rbackward(self, ctx: PassContext, s: BatchNormSaved, rd: Optional[Tensor], need_dx: bool) -> Tensor:
        ug, _ = self._direction(ctx)
        if s.rmean is None:  # nothing moved up to here: R{z} = 0 and no direction
            rmean = q = torch.zeros_like(s.mean)
        else:
            rmean, q = s.rmean, s.q
        rdout = None if rd is None else (rd if self.pool else to5(rd))
        rdz, rdgamma, rdbeta = ctx.kernels.bn_act_pool_rbackward(
            s.dout, rdout, s.z, s.rz, s.mean, s.rstd, rmean, q, s.gamma, s.beta, ug, s.idx,
            slope=self.slope, pool=self.pool)
        row = self.row(ctx.step)
        ctx.put(self.weight, rdgamma, row)
        ctx.put(self.bias, rdbeta, row)
        return rdz.view(s.shape)
