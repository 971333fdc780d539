"""BatchNorm running statistics for ``fastmaml.MAML(bn_stats="running")`` (issue 11, item 6).

The engine normalizes every BatchNorm with the statistics of the current batch, per task (the MAML
paper's transductive mode, ``bn_stats="batch"``), and never touches the running buffers. With
``bn_stats="running"`` the learner also keeps the running statistics the way learn2learn's clones do
(they share the model's buffers, and every training-mode forward updates them), and normalizes with
them in evaluation mode.

Training mode: the order of the updates
---------------------------------------
A per-task loop (learn2learn's ``clone()`` / ``adapt`` / query forward) runs, for task t = 0..T-1:

    support forward at theta_0, ..., support forward at theta_{K-1}, query forward at theta_K

(with MAML++ multi-step weights, also the query forward at theta_k right after the update that made
theta_k, for every 1 <= k < K with w_k != 0: S_0, Q_1, S_1, Q_2, ..., S_{K-1}, Q_K). Each forward f
updates every BatchNorm module it calls, in that order, with the statistics of its input z_f
(per channel c over the batch and the spatial positions, n elements per channel):

    mean_f[c] = (1/n) sum z_f[., c, .]
    var_f[c]  = 1/(n-1) sum (z_f[., c, .] - mean_f[c])^2              (unbiased)
    num_batches_tracked <- num_batches_tracked + 1
    r <- (1 - m) r + m s_f            (s_f = mean_f for running_mean, var_f for running_var)
    m = momentum, or 1 / num_batches_tracked (the cumulative average) when momentum is None

The engine never builds this per-task loop: it runs all tasks at once (and its reverse pass
recomputes support passes, which must not count). So this module records the statistics in a
separate pass, without autograd, over the iterates that the engine's forward produced
(:class:`Recorder`, fed by the engine's ``observe(k, theta_k)`` callback), and applies the F updates
of one module at once, in closed form, when the call succeeded:

    momentum m:     r_F = (1 - m)^F r_0 + sum_{i=1..F} m (1 - m)^{F-i} s_i
    momentum None:  r_F = (N r_0 + sum_i s_i) / (N + F)      (N = num_batches_tracked before)

which is the sequential recursion above, summed in float64 (equal to it up to rounding). Each
recorded pass is one forward of every task's model without autograd: on the engine's fused path
(:class:`FusedStatistics`), one task-batched forward on the project's layer kernels whose saved
BatchNorm inputs z [T, N, C, H, W] give the statistics; on the generic path
(:func:`pass_statistics`), the module per task (``torch.func.vmap`` or a loop over the tasks, as the
engine batches), a forward pre-hook on each BatchNorm module reading its input. What is kept is
[T, C] per module call and pass: a few numbers.

Evaluation mode: BatchNorm modules in ``eval()`` normalize with their running statistics and update
nothing (``fastmaml.functional.batch_statistics(model, keep_eval=True)`` leaves them alone); the
engine's fused path does not run them, so the learner uses the generic path then.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from .functional import TaskBatchedModel, batch_statistics
from .step_context import inner_step, query_step

__all__ = ["BN_STATS", "batchnorm_modules", "check_bn_stats", "check_running", "eval_batchnorms", "Recorder",
           "pass_statistics", "apply_updates"]

BN_STATS = ("batch", "running")

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_modules(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """(name, module) of every BatchNorm (``torch.nn.modules.batchnorm._BatchNorm``) of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _where(name: str) -> str:
    return f"model.{name}" if name else "model"


def check_bn_stats(value) -> str:
    if not isinstance(value, str) or value not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {', '.join(repr(b) for b in BN_STATS)}, got {value!r}")
    return value


def check_running(model: nn.Module) -> None:
    """``bn_stats="running"`` needs every BatchNorm to keep running statistics."""
    for name, m in batchnorm_modules(model):
        if not m.track_running_stats or m.running_mean is None or m.running_var is None:
            raise ValueError(
                f"bn_stats='running' needs every BatchNorm to keep running statistics, but {_where(name)} "
                f"({type(m).__name__}({m.num_features})) has track_running_stats={m.track_running_stats}"
                f"{'' if m.running_mean is not None else ' and no running_mean buffer'}: construct it with "
                "track_running_stats=True, or use bn_stats='batch' (per-task batch statistics, no running ones)")


def eval_batchnorms(model: nn.Module) -> List[str]:
    """Names of the BatchNorm modules in evaluation mode (they normalize with running statistics)."""
    return [_where(n) for n, m in batchnorm_modules(model) if not m.training]


def updating_batchnorms(model: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm modules whose running statistics a training-mode forward updates."""
    return [m for _, m in batchnorm_modules(model) if m.training and m.track_running_stats]


# -- the statistics pass ------------------------------------------------------------------------
def pass_statistics(batched: TaskBatchedModel, bns: Sequence[_BatchNorm], flat: Tensor, x,
                    step: int) -> List[Tuple[int, Tensor, Tensor]]:
    """One forward of every task's model (``flat`` [T, P] or [P], inputs x [T, N, ...]) at inner
    ``step``, without autograd; returns, per call of a module of ``bns`` in call order,
    (index into ``bns``, mean [T, C], unbiased var [T, C]) of that call's input.

    BatchNorm modules in training mode normalize with the batch's statistics (updating nothing);
    those in evaluation mode with their running statistics, as in the engine's forward."""
    model, layout = batched.model, batched.layout
    T = x.shape[0]
    if flat.dim() == 1:
        flat = flat.expand(T, -1)
    order: List[List[int]] = []
    index = {id(m): i for i, m in enumerate(bns)}

    def one(params, xt):
        rec: List[Tuple[int, Tensor, Tensor]] = []

        def hook(mod, inputs):
            z = inputs[0]
            dims = [0] + list(range(2, z.dim()))
            rec.append((index[id(mod)], z.mean(dims), z.var(dims, correction=1)))

        handles = [m.register_forward_pre_hook(hook) for m in bns]
        try:
            batched._one_task(params, xt)
        finally:
            for h in handles:
                h.remove()
        order.append([i for i, _, _ in rec])
        return tuple(t for _, mean, var in rec for t in (mean, var))

    with torch.no_grad(), batch_statistics(model, keep_eval=True), inner_step(step):
        if batched.resolved_batching(flat.device) == "vmap":
            out = vmap(one)(layout.views(flat), x)
        else:
            rows = [one(layout.views(row), x[t]) for t, row in enumerate(flat.unbind(0))]
            if any(o != order[0] for o in order):
                raise RuntimeError("bn_stats='running': the tasks' forwards called the BatchNorm modules in "
                                   "different orders (data-dependent control flow); their statistics cannot be "
                                   "batched over tasks")
            out = tuple(torch.stack(ts) for ts in zip(*rows)) if rows and rows[0] else ()
    calls = order[0] if order else []
    return [(i, out[2 * j], out[2 * j + 1]) for j, i in enumerate(calls)]


class FusedStatistics:
    """The statistics pass on the engine's fused runner: ``(flat, x, step)`` -> the same list as
    :func:`pass_statistics`, from one task-batched forward on the fused layer kernels (the runner's
    ``FusedModel``; its saved BatchNorm inputs ``z`` [T, N, C, H, W]). :meth:`of` returns None for
    another runner, or when the model's compiled program cannot be matched to its BatchNorm modules
    (then the generic pass runs)."""

    def __init__(self, runner, pairs: List[Tuple[int, int]]) -> None:
        self.runner = runner
        self.pairs = pairs  # (node index, index into bns), in call order

    @classmethod
    def of(cls, runner, bns: Sequence[_BatchNorm]) -> Optional["FusedStatistics"]:
        if getattr(runner, "kind", None) != "fused":
            return None
        from .layers.program import BatchNormBlock
        from .models import PerStepBatchNorm

        blocks = [j for j, n in enumerate(runner.nodes) if isinstance(n, BatchNormBlock)]
        mods = [(n, m) for n, m in runner.model.named_modules()
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, PerStepBatchNorm))]
        if len(blocks) != len(mods):
            return None
        index = {id(m): i for i, m in enumerate(bns)}
        pairs = []
        for j, (name, m) in zip(blocks, mods):
            node = runner.nodes[j]
            if node.weight is not None and node.weight != (f"{name}.weight" if name else "weight"):
                return None
            if (node.steps > 0) != isinstance(m, PerStepBatchNorm):
                return None
            if id(m) in index:
                pairs.append((j, index[id(m)]))
        return cls(runner, pairs)

    def __call__(self, flat: Tensor, x: Tensor, step: int) -> List[Tuple[int, Tensor, Tensor]]:
        fused = self.runner.model_on(x.device)
        if flat.dim() == 1:
            flat = flat.expand(x.shape[0], -1)
        with torch.no_grad():
            _, saved = fused._forward(fused.params(flat), x, save=True, step=step)
            out = []
            for j, i in self.pairs:
                # the kernel's per-task mean [T, C]; the variance by a second pass over z (a plain
                # var_mean over dims (1, 3, 4) of this layout is 3x slower on the CPU)
                z, mean = saved[j].z, saved[j].mean
                n = z.shape[1] * z.shape[3] * z.shape[4]
                var = (z - mean[:, None, :, None, None]).pow(2).sum(dim=(1, 3, 4)) / (n - 1)
                out.append((i, mean, var))
        return out


class Recorder:
    """The running-statistics updates of one learner call, recorded pass by pass and applied at once.

    ``record(flat, x, step, offset)`` runs :func:`pass_statistics` for tasks ``offset..offset+T-1``
    (a task chunk starts at its offset); ``apply()`` updates the buffers of every module in the order
    (task, recording order within the task): the per-task loop's order when each task's passes are
    recorded in the loop's order (``observer`` does that for the engine's inner loop)."""

    def __init__(self, batched: TaskBatchedModel, bns: Sequence[_BatchNorm], runner=None) -> None:
        self.batched = batched
        self.bns = list(bns)
        # the engine's fused runner, when the call runs on it (batch statistics: no BatchNorm in eval)
        self.fused = FusedStatistics.of(runner, self.bns) if runner is not None else None
        # (first task, number of tasks, sequence number, the pass's statistics)
        self.passes: List[Tuple[int, int, int, List[Tuple[int, Tensor, Tensor]]]] = []
        self.applied = False

    def record(self, flat: Tensor, x, step: int, offset: int = 0) -> None:
        if self.fused is not None and isinstance(x, Tensor):
            stats = self.fused(flat.detach(), x, step)
        else:
            stats = pass_statistics(self.batched, self.bns, flat.detach(), x, step)
        self.passes.append((offset, x.shape[0], len(self.passes), stats))

    def observer(self, support_x, query_x, steps: int, weights: Optional[Sequence[float]] = None,
                 offset: int = 0) -> Callable[[int, Tensor], None]:
        """The engine's ``observe(k, theta_k)`` callback for an inner loop of ``steps`` = K steps
        (k = 0..K, in increasing k): records the query pass at theta_k (k = K, or 1 <= k < K with
        ``weights[k-1] != 0``; ``query_x`` None: none) and then the support pass at theta_k (k < K)."""

        def observe(k: int, theta_k: Tensor) -> None:
            if query_x is not None and k >= 1 and (k == steps or (weights is not None and weights[k - 1] != 0.0)):
                self.record(theta_k, query_x, query_step(k), offset)
            if k < steps:
                self.record(theta_k, support_x, k, offset)

        return observe

    def apply(self) -> None:
        """Update the running buffers (once; a second call is an error)."""
        if self.applied:
            raise RuntimeError("Recorder.apply ran twice: the running statistics would be updated twice")
        self.applied = True
        per_module: Dict[int, List[Tuple[Tuple[int, int, int], Tensor, Tensor]]] = {}
        for offset, T, seq, stats in self.passes:
            for call, (i, mean, var) in enumerate(stats):
                for t in range(T):
                    per_module.setdefault(i, []).append(((offset + t, seq, call), mean[t], var[t]))
        for i, rows in per_module.items():
            rows.sort(key=lambda r: r[0])
            apply_updates(self.bns[i], torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]))


def apply_updates(m: _BatchNorm, means: Tensor, variances: Tensor) -> None:
    """F sequential training-mode updates of ``m``'s running buffers by batch statistics means [F, C]
    and unbiased variances [F, C] (row 0 first), in closed form (module docstring), in float64."""
    F = means.shape[0]
    if F == 0:
        return
    n0 = int(m.num_batches_tracked)
    if m.momentum is None:
        total = n0 + F
        w = torch.full((F,), 1.0 / total, dtype=torch.float64)
        a0 = n0 / total
    else:
        mom = float(m.momentum)
        w = mom * (1.0 - mom) ** torch.arange(F - 1, -1, -1, dtype=torch.float64)
        a0 = (1.0 - mom) ** F
    w = w.to(means.device)
    with torch.no_grad():
        for buf, s in ((m.running_mean, means), (m.running_var, variances)):
            new = a0 * buf.double() + (w[:, None] * s.double()).sum(0)
            buf.copy_(new.to(buf.dtype))
        m.num_batches_tracked.add_(F)
