"""Triton kernels of the batched conjugate-gradient vector updates (implicit MAML); semantics:
:mod:`fastmaml.kernels.cg_torch`.

One program per (task, block of columns): ``cg_step`` writes x + alpha p and r - alpha Ap and adds
the block's sum of r_new^2 into the task's entry of a float32/float64 workspace (``atomic_add``: the
last bits of ||r||^2 may vary from run to run); ``cg_direction`` writes r + beta p. Under
``TRITON_INTERPRET=1`` (set before import) they also run on CPU tensors.
"""

try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or an install that cannot be imported
    raise ImportError(f"fastmaml.triton.cg_ops needs triton: {exc}") from exc

import torch
from torch import Tensor

__all__ = ["cg_step", "cg_direction"]

_BLOCK = 1024


@triton.jit
def _cg_step_kernel(x_ptr, r_ptr, p_ptr, ap_ptr, alpha_ptr, xo_ptr, ro_ptr, rs_ptr, P,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    off = t * P + cols
    a = tl.load(alpha_ptr + t)
    x = tl.load(x_ptr + off, mask=mask, other=0.0)
    r = tl.load(r_ptr + off, mask=mask, other=0.0)
    p = tl.load(p_ptr + off, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + off, mask=mask, other=0.0)
    rn = r - a * ap
    tl.store(xo_ptr + off, x + a * p, mask=mask)
    tl.store(ro_ptr + off, rn, mask=mask)
    rr = rn.to(ACC)
    tl.atomic_add(rs_ptr + t, tl.sum(tl.where(mask, rr * rr, 0.0), axis=0))


@triton.jit
def _cg_direction_kernel(r_ptr, p_ptr, beta_ptr, out_ptr, P, BLOCK: tl.constexpr):
    t = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    off = t * P + cols
    b = tl.load(beta_ptr + t)
    r = tl.load(r_ptr + off, mask=mask, other=0.0)
    p = tl.load(p_ptr + off, mask=mask, other=0.0)
    tl.store(out_ptr + off, r + b * p, mask=mask)


def _block(P: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(max(P, 16)))


def cg_step(x: Tensor, r: Tensor, p: Tensor, Ap: Tensor, alpha: Tensor):
    x, r, p, Ap, alpha = (t.contiguous() for t in (x, r, p, Ap, alpha))
    T, P = x.shape
    xo, ro = torch.empty_like(x), torch.empty_like(r)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rs = torch.zeros(T, dtype=acc, device=x.device)
    B = _block(P)
    _cg_step_kernel[(triton.cdiv(P, B), T)](x, r, p, Ap, alpha, xo, ro, rs, P, BLOCK=B,
                                             ACC=tl.float64 if acc == torch.float64 else tl.float32)
    return xo, ro, rs.to(x.dtype)


def cg_direction(r: Tensor, p: Tensor, beta: Tensor) -> Tensor:
    r, p, beta = (t.contiguous() for t in (r, p, beta))
    T, P = r.shape
    out = torch.empty_like(r)
    B = _block(P)
    _cg_direction_kernel[(triton.cdiv(P, B), T)](r, p, beta, out, P, BLOCK=B)
    return out
