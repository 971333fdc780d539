"""This process's place in a distributed training run (``fastmaml train --nproc N`` or torchrun):
the hooks that the training loop (:mod:`fastmaml.app.training_loop`) calls on every rank.

:class:`Context` holds the rank, the world size and the timeout, and does the run's collectives:
``release`` (rank 0 tells the others to start, with its checkpoint), ``sync`` (after each rank's
``meta_step`` on its slice of the meta-batch: ONE all-reduce of the gradients, the loss, the
accuracy and the stop flag, with the library's :func:`fastmaml.distributed.all_reduce_grads`, and a
parameter checksum every ``CHECK_EVERY`` iterations), ``run_episodes`` (validation shared by the
ranks) and ``final_check``. A collective that fails (a rank died, or hung past ``--dist-timeout``)
becomes a one-line :class:`~fastmaml.app.errors.TrainingError`. :func:`current` is None in a
1-process run. Starting the ranks is :mod:`fastmaml.app.distributed_train`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..distributed import ParameterDrift, all_reduce_grads, check_in_sync, task_slice, trainable
from ..maml import MetaStepOutput
from .episodes import run_episodes
from .errors import TrainingError

__all__ = ["Context", "current", "set_current", "world_size", "check_world_size", "CHECK_EVERY", "FAULT_ENV"]

CHECK_EVERY = 50  # iterations between two parameter checksums in training
FAULT_ENV = "FASTMAML_FAULT"  # tests: "RANK:ITER:kill", "RANK:ITER:hang" or "RANK:ITER:drift"


class Context:
    """This process's place in a distributed training run."""

    def __init__(self, rank: int, world: int, local_rank: int, timeout_s: float, device: torch.device):
        self.rank, self.world, self.local_rank, self.timeout_s, self.device = rank, world, local_rank, timeout_s, device
        self.released = False
        self.last_check = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def slice(self, num_tasks: int) -> slice:
        return task_slice(num_tasks, self.rank, self.world)

    # rank 0 tells the others whether to train, and with which checkpoint
    def release(self, state: Optional[Dict[str, Any]]) -> None:
        self.released = True
        try:
            self._broadcast(("go", state))
        except RuntimeError as e:
            raise self.fail("starting the other ranks", e) from None

    def abort(self, code: int) -> None:
        if not self.released:
            self.released = True
            try:
                self._broadcast(("stop", code))
            except RuntimeError:
                pass

    def _broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_leader(self):
        return self._broadcast(None)

    def fail(self, what: str, e: BaseException):
        text = " ".join(str(e).split())[:300]
        return TrainingError(f"rank {self.rank}/{self.world}: {what} failed: {text}. Another rank died, or hung "
                             f"past --dist-timeout {self.timeout_s:g}s; the job stops (rank 0's last checkpoint "
                             "is intact: continue with --resume)")

    def sync(self, learner, out, stop, it: int, sampler=None):
        """After this rank's meta_step: the one all-reduce of the gradients, the loss, the accuracy
        and the stop flag (overlapped with sampling the next batch), a periodic checksum; returns the
        global metrics as a MetaStepOutput and sets ``stop.requested`` when any rank asked to stop."""
        _fault(self.rank, it, learner)
        self._hook_signals(stop)
        n = out.task_losses.numel()
        acc = out.task_accuracy
        extras = torch.stack([out.loss.detach().double() * n,
                              acc.double().sum() if acc is not None else torch.zeros((), dtype=torch.float64),
                              torch.tensor(float(n), dtype=torch.float64),
                              torch.tensor(1.0 if self._signalled else 0.0, dtype=torch.float64)])
        total = getattr(sampler, "num_tasks", None) or n * self.world
        try:
            pending = all_reduce_grads(learner, weight=n / total, extras=extras.to(self.device), async_op=True)
            if sampler is not None:
                sampler.prefetch()  # overlaps the all-reduce
            red = pending.wait()
            if it == 1 or it - self.last_check >= CHECK_EVERY:
                self.last_check = it
                check_in_sync(learner, f"after the all-reduce of iteration {it}")
        except ParameterDrift as e:
            raise TrainingError(f"rank {self.rank}/{self.world}: {e}") from None
        except RuntimeError as e:
            raise self.fail(f"the all-reduce of iteration {it}", e) from None
        red = red.double().cpu()
        tasks = float(red[2])
        stop.requested = bool(red[3] > 0)  # the same decision on every rank, at the same iteration
        dtype = out.loss.dtype
        return MetaStepOutput(torch.tensor(float(red[0]) / tasks, dtype=dtype), out.task_losses,
                              None if acc is None else torch.tensor([float(red[1]) / tasks], dtype=dtype))

    def _hook_signals(self, stop) -> None:
        """SIGINT / SIGTERM set a flag that the next all-reduce shares (``stop.requested`` is set
        from the agreed value only, so that all ranks stop after the same iteration); a second
        SIGINT aborts, as in 1-process runs. The trainer restores the previous handlers at its end."""
        if getattr(self, "_hooked", False):
            return
        self._hooked = True
        self._signalled = bool(stop.requested)

        def handle(signum, frame):
            if self._signalled and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signalled = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, handle)
            except ValueError:  # not the main thread
                pass

    def run_episodes(self, learner, episodes, steps: int, classification: bool, ways=None, per_pass=None):
        """Distributed validation: rank r evaluates the batches i with i % W == r of the fixed
        episodes; every rank gets all per-episode losses and accuracies, in the 1-process order."""
        mine = [(i, run_episodes(learner, [batch], steps, classification, ways, per_pass))
                for i, batch in enumerate(episodes) if i % self.world == self.rank]
        gathered: List[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, mine)
        except RuntimeError as e:
            raise self.fail("gathering the validation results", e) from None
        losses: List[float] = []
        accs: List[float] = []
        for _, (lo, ac) in sorted((x for part in gathered for x in part), key=lambda x: x[0]):
            losses += lo
            accs += ac
        return losses, accs

    def final_check(self, learner) -> None:
        try:
            check_in_sync(learner, "at the end of training")
        except ParameterDrift as e:
            raise TrainingError(f"rank {self.rank}/{self.world}: {e}") from None
        except RuntimeError as e:
            raise self.fail("the final parameter check", e) from None


_CONTEXT: Optional[Context] = None


def current() -> Optional[Context]:
    """The training run's context when this process is one of several ranks, else None."""
    return _CONTEXT


def set_current(ctx: Optional[Context]) -> None:
    """Enter (``ctx``) or leave (None) a distributed training run: :mod:`fastmaml.app.distributed_train`
    sets it around a rank's training, the training loop reads it through :func:`current`."""
    global _CONTEXT
    _CONTEXT = ctx


def _fault(rank: int, it: int, learner=None) -> None:
    """Test hook: ``FASTMAML_FAULT=RANK:ITER:kill|hang|drift`` kills (SIGKILL) or hangs that rank
    there, or changes one of its parameters by 1e-6 (relative)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, i, what = spec.split(":")
    if int(r) == rank and int(i) == it:
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "drift":
            with torch.no_grad():
                p = trainable(learner)[0].view(-1)
                p[0] += 1e-6 * (abs(float(p[0])) + 1e-6)
            return
        while True:
            time.sleep(3600)



def check_world_size(state: Optional[Dict[str, Any]], ckpt_path) -> None:
    """Resuming: a warning when the checkpoint was written by a run of another world size."""
    if state is None:
        return
    then = int(state.get("world_size", 1))
    now = _CONTEXT.world if _CONTEXT is not None else 1
    if then != now:
        print(f"fastmaml: warning: {ckpt_path} was written by a run of {then} process(es), this run has {now}: "
              f"the training goes on with the same global meta-batch (the same tasks), but the gradient sums "
              f"are rounded in another order, so the run is no longer bitwise identical to an uninterrupted "
              f"one (resume with --nproc {then} for that)", file=sys.stderr)


def world_size() -> int:
    return _CONTEXT.world if _CONTEXT is not None else 1

