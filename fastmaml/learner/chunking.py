"""Task chunks: a meta-step over T tasks run c tasks at a time (``MAML(task_chunk=...)``).

Each chunk's meta-gradient is a mean over its own tasks; weighted by c/T and summed
(:func:`combine_chunks`) it is the unchunked meta-gradient up to rounding, while peak activation
memory scales with c instead of T. ``task_chunk="auto"`` measures the peak of small chunks
(:func:`measure_peak`) and takes the largest c that fits the memory budget (:func:`probe_chunk`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..functional import LossFn
from ..memory_budget import default_memory_budget
from ..reference import maml as reference


def chunk_size(learner, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int, weights: Sequence[float],
               loss_fn: Optional[LossFn]) -> int:
    """Tasks per chunk for this batch: all T (``task_chunk=None``), ``task_chunk``, or for ``"auto"`` the
    probed size for these shapes and options (:func:`probe_chunk`, cached in ``learner._auto_chunk``)."""
    T = sx.shape[0]
    if learner.task_chunk is None:
        return T
    if learner.task_chunk != "auto":
        return min(learner.task_chunk, T)
    key = (tuple(sx.shape[1:]), tuple(sy.shape[1:]), tuple(qx.shape[1:]), tuple(qy.shape[1:]), sx.dtype,
           sy.dtype, str(sx.device), steps, tuple(weights), learner.first_order, learner.memory, loss_fn)
    if key not in learner._auto_chunk:
        learner._auto_chunk[key] = probe_chunk(learner, sx, sy, qx, qy, steps, weights, loss_fn, learner.memory_budget)
    return min(learner._auto_chunk[key], T)


def combine_chunks(results: List, weights: List[float]):
    """One result from the results of task chunks: gradients and the objective are each chunk's
    (a mean over its own tasks) weighted by its share of the tasks; per-task values concatenated."""
    first = results[0]
    out = {}
    for f in fields(first):
        vals = [getattr(r, f.name) for r in results]
        if f.name in ("query_losses", "query_accuracy"):
            out[f.name] = None if vals[0] is None else torch.cat(vals, 0)
        elif f.name in ("support_losses", "query_losses_all"):
            out[f.name] = torch.cat(vals, 1)
        elif isinstance(vals[0], dict):
            out[f.name] = {k: sum(w * v[k] for w, v in zip(weights, vals)) for k in vals[0]}
        elif vals[0] is None:
            out[f.name] = None
        else:
            acc = vals[0] * weights[0]
            for w, v in zip(weights[1:], vals[1:]):
                acc = acc + w * v
            out[f.name] = acc
    return type(first)(**out)


def _rss_peak_reset() -> Optional[int]:
    """Linux: return unused heap to the system, reset the peak resident set (``VmHWM``) to the
    current one, and return it; None where that is not possible."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except (OSError, AttributeError, ValueError):
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(key)


def measure_peak(fn, device: torch.device) -> Tuple[int, str]:
    """Run ``fn()`` and return (the peak bytes it added on top of what was held before, the method).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics. CPU (Linux): the
    process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after
    ``malloc_trim``) over its resident set before; elsewhere the allocation events of
    ``torch.profiler`` (torch's own allocations only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - base, 0), "torch.cuda.max_memory_allocated"
    base = _rss_peak_reset()
    if base is not None:
        fn()
        return max(_proc_status("VmHWM") - base, 0), "peak resident set (VmHWM after clear_refs)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak, "torch.profiler allocation events"


def probe_chunk(learner, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int,
                weights: Sequence[float], loss_fn: Optional[LossFn], budget: Optional[int]) -> int:
    """``task_chunk="auto"``: the largest chunk whose meta-step fits ``budget`` bytes.

    Measures (:func:`measure_peak`) the eager meta-step of 1 task and of min(T, 4) tasks of this
    batch, after one unmeasured warm-up: peak(c) ~ fixed + c * per_task, so
    c = (0.9 * budget - fixed) // per_task, clipped to [1, T]. On the CPU the resident-set measure
    can miss memory that the allocator reuses from earlier steps: the budget is a target, not a
    hard limit (measured: a 200 MiB budget on the standard workload gave c = 3 and a 245 MiB peak
    in a fresh process, whose first step also pays one-time costs). The probe's gradients are
    discarded (the
    model and ``.grad`` are untouched). The choice is in ``learner.chunk_info``."""
    T = sx.shape[0]
    device = sx.device
    budget = default_memory_budget(device) if budget is None else budget

    def run(c: int):
        def fn():
            if learner.backend == "reference":
                reference.meta_gradient(learner.model, learner.inner_lr, learner.layout, sx[:c], sy[:c], qx[:c],
                                        qy[:c], steps, learner.first_order, weights, loss_fn)
            else:
                learner.engine.meta_gradient(sx[:c], sy[:c], qx[:c], qy[:c], steps, learner.first_order, weights,
                                             loss_fn, learner.memory)
        return fn

    run(1)()  # warm-up: lazy initialization is not a per-task cost
    m1, method = measure_peak(run(1), device)
    c2 = min(T, 4)
    if c2 > 1:
        m2, _ = measure_peak(run(c2), device)
        per_task = max((m2 - m1) / (c2 - 1), m2 / (2 * c2), 1.0)
        fixed = max(m2 - c2 * per_task, 0.0)
    else:
        per_task, fixed = max(float(m1), 1.0), 0.0
    c = max(1, int((0.9 * budget - fixed) // per_task))  # 10% margin; not clipped to T (cached)
    learner.chunk_info = {"task_chunk": min(c, T), "budget": budget, "per_task_bytes": int(per_task),
                          "fixed_bytes": int(fixed), "method": method, "tasks": T}
    return c
