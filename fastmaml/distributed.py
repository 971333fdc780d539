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

``fastmaml train CONFIG --nproc N`` (one machine) and ``torchrun ... -m fastmaml train CONFIG`` (one
or several machines) run the training loop of :mod:`fastmaml.train` this way: rank 0 alone writes
the metrics, checkpoints and progress bar; a rank that dies or hangs makes the others fail within
``--dist-timeout`` seconds, and the job exits non-zero with a one-line error.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# --nproc and --dist-timeout are defined in fastmaml/distributed_args.py (no torch import there)
from .distributed_args import DEFAULT_TIMEOUT_S, _positive_seconds, add_arguments  # noqa: E402,F401

CHECK_EVERY = 50  # iterations between two parameter checksums in training
FAULT_ENV = "FASTMAML_FAULT"  # tests: "RANK:ITER:kill", "RANK:ITER:hang" or "RANK:ITER:drift"


class ParameterDrift(RuntimeError):
    """The ranks' parameters differ: data-parallel training has gone wrong."""


# -- the pieces any loop can use --------------------------------------------------------------------

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


# -- the trainer's side: process group, launch, the hooks of fastmaml.train -------------------------

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
        from .train import TrainingError

        text = " ".join(str(e).split())[:300]
        return TrainingError(f"rank {self.rank}/{self.world}: {what} failed: {text}. Another rank died, or hung "
                             f"past --dist-timeout {self.timeout_s:g}s; the job stops (rank 0's last checkpoint "
                             "is intact: continue with --resume)")

    def sync(self, learner, out, stop, it: int, sampler=None):
        """After this rank's meta_step: the one all-reduce of the gradients, the loss, the accuracy
        and the stop flag (overlapped with sampling the next batch), a periodic checksum; returns the
        global metrics as a MetaStepOutput and sets ``stop.requested`` when any rank asked to stop."""
        from .maml import MetaStepOutput

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
            from .train import TrainingError

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

    def run_episodes(self, learner, episodes, steps: int, classification: bool):
        """Distributed validation: rank r evaluates the batches i with i % W == r of the fixed
        episodes; every rank gets all per-episode losses and accuracies, in the 1-process order."""
        from .evaluate import run_episodes

        mine = [(i, run_episodes(learner, [batch], steps, classification))
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
            from .train import TrainingError

            raise TrainingError(f"rank {self.rank}/{self.world}: {e}") from None
        except RuntimeError as e:
            raise self.fail("the final parameter check", e) from None


class SliceSampler:
    """Wraps a task sampler: ``sample(T)`` draws the global batch (identically on every rank) and
    returns this rank's slice; ``prefetch()`` draws the next one ahead (while the all-reduce runs);
    ``state_dict()`` is the state after the last batch handed out (a checkpoint resumes exactly)."""

    def __init__(self, ds, ctx: Context, num_tasks: int):
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


_CONTEXT: Optional[Context] = None


def current() -> Optional[Context]:
    """The training run's context when this process is one of several ranks, else None."""
    return _CONTEXT


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


def wanted(args) -> bool:
    """Whether ``fastmaml train`` must launch ranks (--nproc) or join a run (torchrun's env) first."""
    if _CONTEXT is not None:
        return False
    if getattr(args, "nproc", None) is not None and "RANK" not in os.environ:
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train_main(args) -> int:
    """``fastmaml train`` when distributed: launch the ranks (--nproc) or run this rank."""
    from .configs import UserError

    if "RANK" not in os.environ:
        n = args.nproc
        if n < 1:
            raise UserError(f"--nproc {n}: expected a positive int")
        if n == 1:
            args.nproc = None
            from . import train

            return train.main(args)
        _check_world(args, n)
        return launch(args, n)
    return _rank_main(args)


def _check_world(args, world: int) -> None:
    from . import configs
    from .configs import UserError

    config = configs.resolve(args.config, args.overrides)
    if config.get("algorithm") == "reptile" and config.get("reptile_variant") == "serial":
        raise UserError("serial Reptile adapts the tasks of a meta-batch in turn, each from the previous "
                        "one's result, so they cannot be shared by several processes; use --set "
                        "reptile_variant=batched, or 1 process")
    if config["meta_batch"] < world:
        raise UserError(f"meta_batch={config['meta_batch']} tasks cannot be shared by {world} processes: each "
                        f"needs at least one (use at most {config['meta_batch']} processes, or --set meta_batch=N)")


def _rank_main(args) -> int:
    global _CONTEXT
    from . import configs, train
    from .configs import UserError

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise UserError(f"--dist-timeout {timeout:g}: expected a positive number of seconds")
    try:
        _check_world(args, world)
    except UserError as e:
        if rank == 0:
            raise
        return e.code  # every rank finds the same mistake: rank 0 alone reports it
    device = train.resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {rank}/{world}: cannot join the process group "
                        f"({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                        f"{' '.join(str(e).split())[:300]}") from None
    _CONTEXT = ctx = Context(rank, world, local_rank, timeout, device)
    code = 1
    try:
        if rank == 0:
            code = train.main(args)
        else:
            code = _follower(args, ctx)
        return code
    except UserError as e:
        code = e.code
        raise
    finally:
        if rank == 0:
            ctx.abort(code)
        _CONTEXT = None
        leave_group(rank, world, clean=code == 0, timeout_s=min(timeout, 60.0))


_CHECKOUT_KEY = "fastmaml/checked_out"


def leave_group(rank: int, world: int, clean: bool, timeout_s: float) -> None:
    """Destroy the process group, rank 0 last.

    Rank 0's process hosts the rendezvous store (a TCP server). A rank still tearing down its gloo
    connections when rank 0 exits can die with SIGABRT ("terminate called without an active
    exception"; about 1 run in 20-50 of the 2-process test here). So after a clean run every rank
    passes a barrier, the others destroy their group and check out in the store, and rank 0 waits
    for their check-outs (at most ``timeout_s``) before destroying its own. After a failure nothing
    is awaited: the other ranks may be dead or hung."""
    store = None
    if clean:
        try:
            store = dist.distributed_c10d._get_default_store()
            dist.barrier()
        except (RuntimeError, ValueError, AttributeError):
            store = None
    if store is not None and rank == 0:
        deadline = time.monotonic() + timeout_s
        try:
            while store.add(_CHECKOUT_KEY, 0) < world - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        except RuntimeError:
            pass
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError, AssertionError):
        pass
    if store is not None and rank != 0:
        try:
            store.add(_CHECKOUT_KEY, 1)
        except RuntimeError:
            pass


def _follower(args, ctx: Context) -> int:
    """A rank other than 0: wait for rank 0's checks of the run folder, then train in lockstep."""
    from pathlib import Path

    from . import checkpoint as ckpt_mod
    from . import configs, train

    config = configs.resolve(args.config, args.overrides)
    train.set_threads(args.threads)
    try:
        what, payload = ctx.wait_for_leader()
    except RuntimeError as e:
        raise ctx.fail("waiting for rank 0 to start", e) from None
    if what == "stop":
        return int(payload) if payload else 0
    state = payload
    learner, opt = train.build_learner(config, ctx.device)
    train_ds = train.make_dataset(config, "train", args.data, ctx.device)
    val_ds = None
    if config["val_every"] > 0:
        val_ds = train.make_dataset(config, "val", args.data, ctx.device, queries=config["eval_queries"],
                                    seed=config["val_seed"])
    start, progress_state = 0, {"elapsed": 0.0, "window": {"loss": 0.0, "accuracy": 0.0, "count": 0}}
    if state is not None:
        learner.model.load_state_dict(state["model"])
        learner.inner_lr.load_state_dict(state["inner_lr"])
        opt.load_state_dict(state["optimizer"])
        ckpt_mod.restore_rng(state["rng"])
        train_ds.load_state_dict(state["rng"]["sampler"])
        start, progress_state = state["iteration"], state["progress"]
    run_dir = Path(args.out) if args.out else train.default_run_dir(config)
    return train._loop(config, args, learner, opt, train_ds, val_ds, run_dir, start, progress_state, ctx.device, "")


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


# -- the launcher of --nproc ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_argv(args) -> List[str]:
    """The ``fastmaml train`` arguments of one rank: this command's, less --nproc."""
    argv = ["train", args.config]
    for flag, value in (("--data", args.data), ("--out", args.out), ("--device", args.device),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if args.overrides:
        argv += ["--set", *args.overrides]
    for flag, on in (("--resume", args.resume), ("--force", args.force), ("--quiet", args.quiet)):
        if on:
            argv.append(flag)
    argv += ["--dist-timeout", repr(float(args.dist_timeout))]
    return argv


def launch(args, nproc: int, grace_s: float = 5.0) -> int:
    """Start ``nproc`` ranks of ``fastmaml train`` on this machine (env:// rendezvous on a free local
    port, as torchrun does) and watch them: when one exits non-zero, the others get ``grace_s``
    seconds to stop by themselves (they fail their next collective), then are terminated; the exit
    status is the first failure's. Ctrl-C reaches every rank (same process group): they checkpoint
    and stop."""
    from .configs import UserError

    port = _free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc))
    if "OMP_NUM_THREADS" not in base and args.threads is None:
        base["OMP_NUM_THREADS"] = "1"  # as torchrun does: N processes must not each take every core
    procs: List[subprocess.Popen] = []
    for r in range(nproc):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, "-m", "fastmaml", *rank_argv(args)], env=env))
    first_fail = None  # (rank, code)
    deadline = None

    def forward(signum, frame):  # SIGTERM to the launcher: every rank checkpoints and stops
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    try:
        old_term = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread
        old_term = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            for r, c in enumerate(codes):
                if c not in (None, 0) and first_fail is None:
                    first_fail = (r, c)
                    deadline = time.monotonic() + grace_s
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                time.sleep(2.0)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if first_fail is None:
        return 0
    r, c = first_fail
    how = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with status {c}"
    if c in (2, 130):  # a user error (rank 0 printed it) or a requested stop: nothing to add
        return c
    print(f"fastmaml: error: rank {r} of {nproc} {how}; the other ranks were stopped. The run folder's last "
          "checkpoint is intact: continue with --resume", file=sys.stderr)
    return c if c > 0 else 1
