"""Triton kernels of the fused ops; semantics: :mod:`fastmaml.kernels.flat_torch`.

Flat task-batched layout (docs/design.md §3.1): fast weights ``[T, P]``, meta-parameters ``[P]``.
A learning rate ``lr`` is scalar (0-d), per segment (``[S]`` with int64 ``segments`` ``[P]``) or
per element (``[P]``, ``segments`` None); ``a[p]`` is ``lr``, ``lr[segments[p]]`` or ``lr[p]``.

The Python functions take tensors that the dispatch layer has already validated (contiguous, one
dtype, one device) and return fresh tensors. Under ``TRITON_INTERPRET=1`` (set before this module
is imported) the kernels also run on CPU tensors.

Launch layout: a 2-D grid ``(cdiv(P, BLOCK), cdiv(T, ROWS))``. Each program owns ``BLOCK``
columns and loops over ``ROWS`` consecutive tasks, so the per-column learning rate (and a shared
``[P]`` operand) is loaded once per program, and reductions over tasks are accumulated in
registers. ``ROWS`` is chosen so that small P still fills the GPU (``_config``).

Reductions accumulate in float32 (float64 for float64 inputs) and are cast at the end. Scalar and
per-segment reductions (and per-element ones when the tasks are split over several programs) use
``atomic_add`` into a float32/float64 workspace, so their last bits may vary from run to run.

Importing this module raises ``ImportError`` when triton is not installed.
"""

import functools
from typing import Optional, Tuple

try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or an install that cannot be imported
    raise ImportError(f"fastmaml.triton.ops needs triton: {exc}") from exc

import torch
from torch import Tensor

__all__ = ["inner_update", "scale", "segment_dot", "reverse_step"]

# Learning-rate forms, passed to the kernels as tl.constexpr (one specialization each).
LR_SCALAR = 0
LR_SEGMENT = 1
LR_ELEMENT = 2

_BLOCK = 1024  # columns per program (a power of two)
_NUM_WARPS = 4  # 1024 columns / 128 threads = 8 contiguous elements per thread
_PROGRAMS_PER_SM = 4  # split the tasks until about this many programs per SM are launched
_MAX_RUN_LOOP = 8  # per-segment reduction: at most this many distinct ids per block -> one atomic each


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lr_cols(lr_ptr, seg_ptr, cols, mask, LR_FORM: tl.constexpr, ACC: tl.constexpr):
    """The learning rate ``a`` of the columns ``cols`` (masked by ``mask``), as ``ACC``.

    LR_FORM 0: ``lr`` 0-d, a scalar is returned; 1: ``lr[segments[cols]]``; 2: ``lr[cols]``.
    """
    if LR_FORM == 0:
        a = tl.load(lr_ptr).to(ACC)
    elif LR_FORM == 1:
        seg = tl.load(seg_ptr + cols, mask=mask, other=0)
        a = tl.load(lr_ptr + seg, mask=mask, other=0).to(ACC)
    else:
        a = tl.load(lr_ptr + cols, mask=mask, other=0).to(ACC)
    return a


@triton.jit
def _reduce_cols(
    acc,
    cols,
    mask,
    seg_ptr,
    ws_ptr,
    res_ptr,
    LR_FORM: tl.constexpr,
    SPLIT: tl.constexpr,
    MAX_RUN_LOOP: tl.constexpr,
):
    """Add the per-column partial sums ``acc`` ([BLOCK], zero where masked) into the shape of lr.

    LR_FORM 0: ``ws[0] += sum(acc)`` (one atomic per program).
    LR_FORM 1: ``ws[segments[c]] += acc[c]``. When the block's ids span fewer than MAX_RUN_LOOP
    values (segments are usually runs of one id per parameter tensor) each id gets one block
    sum and one atomic; otherwise (arbitrary ids) one atomic per column.
    LR_FORM 2: ``res[c] = acc[c]`` (cast to res's dtype) when one program owns all tasks of its
    columns (SPLIT false); else ``ws[c] += acc[c]`` atomically.
    ``ws`` is float32/float64 and zero-initialised by the caller.
    """
    if LR_FORM == 0:
        tl.atomic_add(ws_ptr, tl.sum(acc, axis=0), sem="relaxed")
    elif LR_FORM == 1:
        seg = tl.load(seg_ptr + cols, mask=mask, other=0)
        lo = tl.min(tl.where(mask, seg, 1 << 62), axis=0)
        hi = tl.max(tl.where(mask, seg, -1), axis=0)
        if hi - lo < MAX_RUN_LOOP:
            for s in range(lo, hi + 1):
                part = tl.sum(tl.where(seg == s, acc, 0.0), axis=0)
                tl.atomic_add(ws_ptr + s, part, sem="relaxed")
        else:
            tl.atomic_add(ws_ptr + seg, acc, mask=mask, sem="relaxed")
    else:
        if SPLIT:
            tl.atomic_add(ws_ptr + cols, acc, mask=mask, sem="relaxed")
        else:
            tl.store(res_ptr + cols, acc.to(res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inner_update_kernel(
    theta_ptr,
    grad_ptr,
    lr_ptr,
    seg_ptr,
    out_ptr,
    T,
    P,
    ROWS,
    LR_FORM: tl.constexpr,
    THETA_ROWS: tl.constexpr,
    GRAD_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[t, p] = theta[t, p] - a[p] * grad[t, p]`` for t < T, p < P.

    theta: [T, P] if THETA_ROWS else [P] (shared by all tasks); grad likewise with GRAD_ROWS;
    out: [T, P] (T == 1 when both are [P]). a[p] from ``lr``/``segments`` per LR_FORM
    (see ``_lr_cols``). Computed in ACC (float32, or float64 for float64), stored in out's dtype.
    Grid: (cdiv(P, BLOCK), cdiv(T, ROWS)); each program does BLOCK columns of ROWS tasks.
    """
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    a = _lr_cols(lr_ptr, seg_ptr, cols, mask, LR_FORM, ACC)
    if not THETA_ROWS:
        theta = tl.load(theta_ptr + cols, mask=mask).to(ACC)
    if not GRAD_ROWS:
        ag = a * tl.load(grad_ptr + cols, mask=mask).to(ACC)
    t0 = pid_t * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    for t in range(t0, t1):
        offs = tl.cast(t, tl.int64) * P + cols
        if THETA_ROWS:
            theta = tl.load(theta_ptr + offs, mask=mask).to(ACC)
        if GRAD_ROWS:
            ag = a * tl.load(grad_ptr + offs, mask=mask).to(ACC)
        tl.store(out_ptr + offs, (theta - ag).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    v_ptr,
    lr_ptr,
    seg_ptr,
    out_ptr,
    T,
    P,
    ROWS,
    LR_FORM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[t, p] = a[p] * v[t, p]`` for t < T, p < P; v, out: [T, P] (T == 1 for [P] inputs).

    a[p] per LR_FORM (see ``_lr_cols``); computed in ACC, stored in out's dtype.
    Grid: (cdiv(P, BLOCK), cdiv(T, ROWS)); each program does BLOCK columns of ROWS tasks.
    """
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    a = _lr_cols(lr_ptr, seg_ptr, cols, mask, LR_FORM, ACC)
    t0 = pid_t * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    for t in range(t0, t1):
        offs = tl.cast(t, tl.int64) * P + cols
        v = tl.load(v_ptr + offs, mask=mask).to(ACC)
        tl.store(out_ptr + offs, (a * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_dot_kernel(
    a_ptr,
    b_ptr,
    seg_ptr,
    ws_ptr,
    res_ptr,
    T,
    P,
    ROWS,
    LR_FORM: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_RUN_LOOP: tl.constexpr,
):
    """``d[s] = sum_{t < T} sum_{p in s} a[t, p] * b[t, p]`` for every entry s of lr's shape.

    a, b: [T, P] (T == 1 for [P] inputs). LR_FORM 0: d is one value, the sum of everything, added
    atomically into ws[0]; 1: ``s = segments[p]``, added atomically into ws[S]; 2: s = p, stored
    into res[P] (or added atomically into ws[P] when SPLIT, i.e. several programs share a column).
    Products and sums in ACC; ws is ACC-typed and zeroed by the caller.
    Grid: (cdiv(P, BLOCK), cdiv(T, ROWS)); each program sums ROWS tasks of BLOCK columns in
    registers, then reduces its columns once (``_reduce_cols``).
    """
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    acc = tl.zeros([BLOCK], dtype=ACC)
    t0 = pid_t * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    for t in range(t0, t1):
        offs = tl.cast(t, tl.int64) * P + cols
        x = tl.load(a_ptr + offs, mask=mask, other=0).to(ACC)
        y = tl.load(b_ptr + offs, mask=mask, other=0).to(ACC)
        acc += x * y
    _reduce_cols(acc, cols, mask, seg_ptr, ws_ptr, res_ptr, LR_FORM, SPLIT, MAX_RUN_LOOP)


@triton.jit
def _reverse_step_kernel(
    v_ptr,
    hv_ptr,
    g_ptr,
    gq_ptr,
    w: "fp64",
    seg_ptr,
    out_ptr,
    ws_ptr,
    res_ptr,
    T,
    P,
    ROWS,
    LR_FORM: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_HV: tl.constexpr,
    HAS_GQ: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_RUN_LOOP: tl.constexpr,
):
    """One pass over [T, P] computing both outputs of the reverse step:

    ``out[t, p] = v[t, p] - hv[t, p] + w * gq[t, p]`` (the hv term only if HAS_HV, the gq term
    only if HAS_GQ), and ``d[s] = -sum_{t < T} sum_{p in s} v[t, p] * g[t, p]`` shaped like lr,
    reduced as in ``_segment_dot_kernel`` (ws / res, LR_FORM, SPLIT).
    v, hv, g, gq, out: [T, P]. w is a float64 scalar. Math in ACC; out stored in its own dtype.
    Grid: (cdiv(P, BLOCK), cdiv(T, ROWS)).
    """
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    wv = tl.full([], w, ACC)
    acc = tl.zeros([BLOCK], dtype=ACC)
    t0 = pid_t * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    for t in range(t0, t1):
        offs = tl.cast(t, tl.int64) * P + cols
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        acc += v * g
        o = v
        if HAS_HV:
            o = o - tl.load(hv_ptr + offs, mask=mask, other=0).to(ACC)
        if HAS_GQ:
            o = o + wv * tl.load(gq_ptr + offs, mask=mask, other=0).to(ACC)
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=mask)
    _reduce_cols(-acc, cols, mask, seg_ptr, ws_ptr, res_ptr, LR_FORM, SPLIT, MAX_RUN_LOOP)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _lr_form(lr: Tensor, segments: Optional[Tensor]) -> int:
    if lr.dim() == 0:
        return LR_SCALAR
    if segments is not None:
        return LR_SEGMENT
    return LR_ELEMENT


def _acc(dtype: torch.dtype):
    """(triton, torch) accumulation dtype: float64 for float64, else float32."""
    if dtype == torch.float64:
        return tl.float64, torch.float64
    return tl.float32, torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(P: int, T: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK, ROWS): columns per program and tasks per program.

    On the GPU, the tasks are split over several programs (ROWS < T) only when cdiv(P, BLOCK)
    programs would not fill the device. Elsewhere (the CPU interpreter) one program per column
    block does all tasks: the fewest program instances. Tests monkeypatch this function.
    """
    block = _BLOCK
    if device.type != "cuda":
        return block, max(T, 1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    n_blocks = triton.cdiv(P, block)
    chunks = max(1, min(T, (_PROGRAMS_PER_SM * _sm_count(index)) // n_blocks))
    return block, triton.cdiv(T, chunks)


def _grid(P: int, T: int, device: torch.device):
    block, rows = _config(P, T, device)
    return block, rows, (triton.cdiv(P, block), triton.cdiv(T, rows))


def _reduction_buffers(lr: Tensor, form: int, split: bool, acc_dtype: torch.dtype):
    """(ws, res): the zeroed ACC workspace for atomics and the result tensor the kernel stores.

    When the kernel stores directly (per element, not split) ws is unused and res is the result;
    otherwise res is unused and the result is ``ws.to(lr.dtype)``. Unused slots get a stand-in
    tensor (the kernel never touches them).
    """
    if form == LR_ELEMENT and not split:
        res = torch.empty_like(lr)
        return res, res
    ws = torch.zeros(lr.shape, dtype=acc_dtype, device=lr.device)
    return ws, ws


def inner_update(theta: Tensor, grad: Tensor, lr: Tensor, segments: Optional[Tensor]) -> Tensor:
    """``theta - a * grad``; theta, grad: [P] or [T, P]; result [T, P] if either is 2-D, else [P]."""
    theta_rows = theta.dim() == 2
    grad_rows = grad.dim() == 2
    P = theta.shape[-1]
    T = theta.shape[0] if theta_rows else (grad.shape[0] if grad_rows else 1)
    out_shape = (T, P) if (theta_rows or grad_rows) else (P,)
    out = torch.empty(out_shape, dtype=theta.dtype, device=theta.device)
    if out.numel() == 0:
        return out
    form = _lr_form(lr, segments)
    seg = segments if form == LR_SEGMENT else lr
    acc, _ = _acc(theta.dtype)
    block, rows, grid = _grid(P, T, theta.device)
    _inner_update_kernel[grid](
        theta, grad, lr, seg, out, T, P, rows,
        LR_FORM=form, THETA_ROWS=theta_rows, GRAD_ROWS=grad_rows, ACC=acc, BLOCK=block,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def scale(v: Tensor, lr: Tensor, segments: Optional[Tensor]) -> Tensor:
    """``a * v``; v: [P] or [T, P]; result shaped like v."""
    out = torch.empty_like(v)
    if out.numel() == 0:
        return out
    P = v.shape[-1]
    T = v.shape[0] if v.dim() == 2 else 1
    form = _lr_form(lr, segments)
    seg = segments if form == LR_SEGMENT else lr
    acc, _ = _acc(v.dtype)
    block, rows, grid = _grid(P, T, v.device)
    _scale_kernel[grid](
        v, lr, seg, out, T, P, rows, LR_FORM=form, ACC=acc, BLOCK=block, num_warps=_NUM_WARPS
    )
    return out


def segment_dot(a: Tensor, b: Tensor, lr: Tensor, segments: Optional[Tensor]) -> Tensor:
    """Sum over tasks and over the elements of each entry of lr of ``a * b``; shaped like lr."""
    if a.numel() == 0:
        return torch.zeros_like(lr)
    P = a.shape[-1]
    T = a.shape[0] if a.dim() == 2 else 1
    form = _lr_form(lr, segments)
    seg = segments if form == LR_SEGMENT else lr
    acc, acc_dtype = _acc(a.dtype)
    block, rows, grid = _grid(P, T, a.device)
    split = grid[1] > 1
    ws, res = _reduction_buffers(lr, form, split, acc_dtype)
    _segment_dot_kernel[grid](
        a, b, seg, ws, res, T, P, rows,
        LR_FORM=form, SPLIT=split, ACC=acc, BLOCK=block, MAX_RUN_LOOP=_MAX_RUN_LOOP,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return res.to(lr.dtype)


def reverse_step(
    v: Tensor,
    hv: Optional[Tensor],
    g: Tensor,
    gq: Optional[Tensor],
    w: float,
    lr: Tensor,
    segments: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """``(v - hv + w * gq, -segment_dot(v, g))`` in one pass; v, hv, g, gq: [T, P].

    hv None: no hv term; gq None or ``w == 0``: no gq term (as in the reference).
    """
    out = torch.empty_like(v)
    if v.numel() == 0:
        return out, torch.zeros_like(lr)
    T, P = v.shape
    w = float(w)
    has_hv = hv is not None
    has_gq = gq is not None and w != 0.0
    form = _lr_form(lr, segments)
    seg = segments if form == LR_SEGMENT else lr
    acc, acc_dtype = _acc(v.dtype)
    block, rows, grid = _grid(P, T, v.device)
    split = grid[1] > 1
    ws, res = _reduction_buffers(lr, form, split, acc_dtype)
    _reverse_step_kernel[grid](
        v, hv if has_hv else v, g, gq if has_gq else v, w, seg, out, ws, res, T, P, rows,
        LR_FORM=form, SPLIT=split, HAS_HV=has_hv, HAS_GQ=has_gq, ACC=acc, BLOCK=block,
        MAX_RUN_LOOP=_MAX_RUN_LOOP, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out, res.to(lr.dtype)
