"""``fastmaml train --nproc N`` and ``torchrun ... -m fastmaml train``: the ranks of a data-parallel
training run (gloo on the CPU, NCCL on GPUs).

:func:`launch` starts N ranks of ``fastmaml train`` on this machine (env:// rendezvous on a free local
port, as torchrun does) and watches them. Each rank (:func:`train_main`) joins the process group and
enters its :class:`~fastmaml.app.rank_context.Context`; rank 0 then runs the 1-process command (it
checks the run folder and writes the metrics, checkpoints and progress bar), the other ranks
(:func:`_follower`) wait for its go and its checkpoint and run the same training loop in lockstep.
A rank that dies or hangs makes the others fail within ``--dist-timeout`` seconds, and the job exits
non-zero with a one-line error. The gradient arithmetic is the library's
(:mod:`fastmaml.distributed`).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist

from ..distributed import backend_for
from . import checkpoint as ckpt_mod
from . import configs, rank_context, training_loop
# --nproc and --dist-timeout are defined in fastmaml/app/distributed_args.py (no torch import there)
from .distributed_args import DEFAULT_TIMEOUT_S
from .errors import UserError
from .run_setup import build_learner, make_dataset, resolve_device, set_threads
from .rank_context import Context
from .run_folder import default_run_dir

__all__ = ["wanted", "train_main", "launch", "rank_argv", "leave_group"]


def wanted(args) -> bool:
    """Whether ``fastmaml train`` must launch ranks (--nproc) or join a run (torchrun's env) first."""
    if rank_context.current() is not None:
        return False
    if getattr(args, "nproc", None) is not None and "RANK" not in os.environ:
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train_main(args, run_one: Callable[[Any], int]) -> int:
    """``fastmaml train`` when distributed: launch the ranks (--nproc) or run this rank.

    ``run_one`` is the 1-process command (:func:`fastmaml.app.train.main`), which this rank's
    training (rank 0) or ``--nproc 1`` runs: passed in, so that this module does not import the
    command that imports it."""
    if "RANK" not in os.environ:
        n = args.nproc
        if n < 1:
            raise UserError(f"--nproc {n}: expected a positive int")
        if n == 1:
            args.nproc = None
            return run_one(args)
        _check_world(args, n)
        return launch(args, n)
    return _rank_main(args, run_one)


def _check_world(args, world: int) -> None:
    config = configs.resolve(args.config, args.overrides)
    if config.get("algorithm") == "reptile" and config.get("reptile_variant") == "serial":
        raise UserError("serial Reptile adapts the tasks of a meta-batch in turn, each from the previous "
                        "one's result, so they cannot be shared by several processes; use --set "
                        "reptile_variant=batched, or 1 process")
    if config["meta_batch"] < world:
        raise UserError(f"meta_batch={config['meta_batch']} tasks cannot be shared by {world} processes: each "
                        f"needs at least one (use at most {config['meta_batch']} processes, or --set meta_batch=N)")


def _rank_main(args, run_one: Callable[[Any], int]) -> int:
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
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {rank}/{world}: cannot join the process group "
                        f"({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                        f"{' '.join(str(e).split())[:300]}") from None
    ctx = Context(rank, world, local_rank, timeout, device)
    rank_context.set_current(ctx)
    code = 1
    try:
        if rank == 0:
            code = run_one(args)
        else:
            code = _follower(args, ctx)
        return code
    except UserError as e:
        code = e.code
        raise
    finally:
        if rank == 0:
            ctx.abort(code)
        rank_context.set_current(None)
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
    config = configs.resolve(args.config, args.overrides)
    set_threads(args.threads)
    try:
        what, payload = ctx.wait_for_leader()
    except RuntimeError as e:
        raise ctx.fail("waiting for rank 0 to start", e) from None
    if what == "stop":
        return int(payload) if payload else 0
    state = payload
    learner, opt = build_learner(config, ctx.device)
    train_ds = make_dataset(config, "train", args.data, ctx.device)
    val_ds = None
    if config["val_every"] > 0:
        val_ds = make_dataset(config, "val", args.data, ctx.device, queries=config["eval_queries"],
                              seed=config["val_seed"], task_rotations="class")
    start, progress_state = 0, {"elapsed": 0.0, "window": {"loss": 0.0, "accuracy": 0.0, "count": 0}}
    if state is not None:
        learner.model.load_state_dict(state["model"])
        learner.inner_lr.load_state_dict(state["inner_lr"])
        opt.load_state_dict(state["optimizer"])
        ckpt_mod.restore_rng(state["rng"])
        train_ds.load_state_dict(state["rng"]["sampler"])
        start, progress_state = state["iteration"], state["progress"]
    run_dir = Path(args.out) if args.out else default_run_dir(config)
    return training_loop.run(config, args, learner, opt, train_ds, val_ds, run_dir, start, progress_state,
                             ctx.device, "")



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
