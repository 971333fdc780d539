"""Data-parallel meta-training on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs).

Each of the W ranks draws the same global meta-batch of T tasks from the run's seed (every rank's
sampler is seeded alike), takes its contiguous slice of it (:func:`task_slice`: sizes differ by at
most one), and computes the meta-gradient of its slice with ``MAML.meta_step`` (a mean over its own
n_r tasks). :func:`all_reduce_grads` then flattens the ``.grad`` of every trainable parameter of the
learner (the model's and the learnable inner rates) into ONE buffer, scales it by n_r / T and
all-reduces it (sum): every rank ends with (1/T) sum over all T tasks, the meta-gradient one process
computes on the whole batch, up to the order of the floating-point sums. Every rank then applies the
same optimizer step, so the parameters stay identical; :func:`check_in_sync` (an all-gathered
checksum of the parameters, run periodically by the trainer) fails loudly if they ever drift.

With your own loop::

    import torch.distributed as dist
    from fastmaml.distributed import all_reduce_grads, task_slice

    dist.init_process_group("gloo")            # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    for sx, sy, qx, qy in batches:              # the same global batch on every rank (same seed)
        s = task_slice(sx.shape[0], rank, world)
        opt.zero_grad()
        learner.meta_step(sx[s], sy[s], qx[s], qy[s])
        all_reduce_grads(learner, weight=(s.stop - s.start) / sx.shape[0])
        opt.step()

:class:`SliceSampler` wraps a task sampler so that each rank gets its slice of the same global batch.

``fastmaml train CONFIG --nproc N`` (one machine) and ``torchrun ... -m fastmaml train CONFIG`` (one
or several machines) run the application's training loop this way (the launcher and the ranks'
collectives are the application's, in its ``distributed_train`` and ``rank_context`` modules): rank 0
alone writes the metrics, checkpoints and progress bar; a rank that dies or hangs makes the others
fail within ``--dist-timeout`` seconds, and the job exits non-zero with a one-line error. This module
is the library's part and imports nothing of the application.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor


class ParameterDrift(RuntimeError):
    """The ranks' parameters differ: data-parallel training has gone wrong."""


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def task_slice(num_tasks: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``num_tasks`` tasks (sizes differ by at most one)."""
    if num_tasks < world:
        raise ValueError(f"a meta-batch of {num_tasks} tasks cannot be shared by {world} processes: "
                         f"every process needs at least one task (meta_batch >= world size)")
    base, extra = divmod(num_tasks, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def trainable(learner: torch.nn.Module) -> List[Tensor]:
    """The parameters the all-reduce carries: every one that requires grad (the model's and, with
    ``learn_lr``, the inner learning rates), in ``learner.parameters()`` order."""
    return [p for p in learner.parameters() if p.requires_grad]


class PendingReduce:
    """An all-reduce in flight (:func:`all_reduce_grads` with ``async_op=True``); ``wait()`` writes the
    reduced gradients back into ``.grad`` and returns the reduced ``extras`` (or None)."""

    def __init__(self, params, had_grad, flat, work, n_extras):
        self._params, self._had_grad, self._flat, self._work, self._n_extras = params, had_grad, flat, work, n_extras

    def wait(self) -> Optional[Tensor]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        flat, offset = self._flat, 0
        for p, had in zip(self._params, self._had_grad):
            n = p.numel()
            if had:
                p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        return flat[offset:].clone() if self._n_extras else None


def all_reduce_grads(learner: torch.nn.Module, weight: Optional[float] = None, extras: Optional[Tensor] = None,
                     async_op: bool = False, group=None):
    """Sum ``weight * .grad`` over the ranks, in one bucketed all-reduce, into every rank's ``.grad``.

    ``weight``: this rank's share of the global meta-batch, n_r / T (default 1 / world size: equal
    slices); ``meta_step`` gives the mean over the rank's own tasks, so the result is the mean over
    all T tasks. The gradients of all trainable parameters (see :func:`trainable`), and ``extras``
    (a 1-d tensor: per-rank numbers to sum along, e.g. the weighted loss), travel in one flat buffer
    of the parameters' dtype. A parameter whose ``.grad`` is None stays None (the ranks must agree on
    which are None). Returns the summed ``extras`` (or None); with ``async_op=True`` a
    :class:`PendingReduce` to ``wait()`` on, so that other work can overlap the communication.
    Without an initialized process group (or with one process) it only scales by ``weight``.
    """
    params = trainable(learner)
    if not params:
        raise ValueError("all_reduce_grads: the learner has no trainable parameters")
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    weight = 1.0 / world if weight is None else float(weight)
    ref = params[0]
    for p in params:
        if p.dtype != ref.dtype or p.device != ref.device:
            raise ValueError(f"all_reduce_grads: one bucket needs one dtype and device; parameters are {ref.dtype} on "
                             f"{ref.device} and {p.dtype} on {p.device}")
    had_grad = [p.grad is not None for p in params]
    pieces = [p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=ref.dtype,
                                                                               device=ref.device) for p in params]
    n_extras = 0
    if extras is not None:
        extras = extras.detach().reshape(-1).to(device=ref.device, dtype=ref.dtype)
        n_extras = extras.numel()
        pieces.append(extras / weight if weight != 0 else extras)  # extras are summed unscaled
    flat = torch.cat(pieces)
    flat.mul_(weight)
    work = None
    if world > 1:
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
    pending = PendingReduce(params, had_grad, flat, work, n_extras)
    return pending if async_op else pending.wait()


def checksum(learner: torch.nn.Module) -> Tensor:
    """[sum, sum of squares, sum weighted by position] of all trainable parameters, in float64."""
    params = trainable(learner)
    dev = params[0].device
    out = torch.zeros(3, dtype=torch.float64, device=dev)
    for i, p in enumerate(params):
        x = p.detach().reshape(-1).double()
        out[0] += x.sum()
        out[1] += (x * x).sum()
        out[2] += (i + 1) * x[:: max(1, x.numel() // 97)].sum()
    return out


def check_in_sync(learner: torch.nn.Module, where: str = "", group=None) -> None:
    """All-gather :func:`checksum` and raise :class:`ParameterDrift` (on every rank) unless all
    ranks hold bitwise the same parameters (they apply the same step to the same reduced gradient)."""
    if not is_active():
        return
    mine = checksum(learner)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
        rows = "; ".join(f"rank {r}: {g.tolist()}" for r, g in enumerate(gathered))
        raise ParameterDrift(f"the ranks' parameters differ{(' ' + where) if where else ''} "
                             f"(checksums [sum, sum of squares, positional]: {rows}); data-parallel training "
                             "is broken (different code, data or hardware on some rank?)")


class SliceSampler:
    """Wraps a task sampler: ``sample(T)`` draws the global batch (identically on every rank) and
    returns this rank's slice, ``ctx.slice(T)`` (``ctx``: any object with that method, such as the
    trainer's rank context); ``prefetch()`` draws the next one ahead (while the all-reduce runs);
    ``state_dict()`` is the state after the last batch handed out (a checkpoint resumes exactly)."""

    def __init__(self, ds, ctx, num_tasks: int):
        self.ds, self.ctx, self.num_tasks = ds, ctx, num_tasks
        self._ahead = None  # (state before the prefetch, the batch)

    def sample(self, num_tasks: int):
        if self._ahead is not None and num_tasks == self.num_tasks:
            batch, self._ahead = self._ahead[1], None
        else:
            self._ahead = None
            batch = self.ds.sample(num_tasks)
        self.num_tasks = num_tasks
        s = self.ctx.slice(num_tasks)
        return tuple(t[s] for t in batch)

    def prefetch(self) -> None:
        if self._ahead is None:
            state = self.ds.state_dict()
            self._ahead = (state, self.ds.sample(self.num_tasks))

    def state_dict(self):
        return self._ahead[0] if self._ahead is not None else self.ds.state_dict()

    def __getattr__(self, name):
        return getattr(self.ds, name)
