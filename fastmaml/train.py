"""``fastmaml train``: the meta-training loop, with metrics, validation, checkpoints and exact resume.

The run folder (default ``runs/<config>``) holds:

* ``config.json``: the resolved config;
* ``metrics.jsonl``: one JSON object per line: ``{"split": "train", "iter", "loss", "accuracy",
  "tasks_per_s", "elapsed"}`` every ``log_every`` iterations (a tenth of the run when it is shorter:
  :func:`log_interval`) and at the last one (means over the iterations since the
  previous line) and ``{"split": "val", "iter", "loss", "loss_ci95", "accuracy", "accuracy_ci95",
  "steps", "episodes"}`` every ``val_every`` iterations (fixed validation episodes);
* ``checkpoint.pt``: every ``checkpoint_every`` iterations and at the end (see :mod:`fastmaml.checkpoint`),
  and ``checkpoint.prev.pt``, the one before it, which ``--resume``, ``eval`` and ``plot`` fall back to
  (saying so) when the latest is damaged;
* ``run.json``: the data folder the run reads (Omniglot, mini-ImageNet), which ``eval`` and ``--resume``
  use when not given ``--data`` (:mod:`fastmaml.run_info`);
* ``train.lock`` while a trainer runs: a second ``fastmaml train`` on the same folder is refused (the
  lock holds the owner's pid; a lock left by a dead process is taken over).

When training stops before its end (Ctrl-C, SIGTERM, a diverged loss), a last training line marked
``"partial": true`` holds the means since the previous line (a resumed run drops it and goes on with
the same window, so its metrics equal an uninterrupted run's). The printed resume command repeats the
data folder, device, threads and ``--set`` of this run.

Resuming (``--resume``) restores the model, the optimizer, the learnable inner learning rates, every
RNG (torch, numpy, Python, the task sampler) and the metric accumulators, and drops the metric lines
written after the checkpoint: a run killed at any moment and resumed ends bitwise identical to an
uninterrupted one (same device, same software). Lines written before the checkpoint that are gone or
damaged (each checkpoint records the file's size and hash, :mod:`fastmaml.metrics_file`) are reported
on resume, and the damaged file is kept as ``metrics.jsonl.damaged-<time>``. The run folder deleted,
moved or replaced during training (or its ``metrics.jsonl`` or ``config.json``) stops training with an
error at the next metrics line or checkpoint, recreating nothing (:mod:`fastmaml.run_guard`).

Iteration ``i`` (1-based) does, in order: sample a task batch, meta-step, (clip), Adam step; a metrics
line; validation; the checkpoint. Validation runs under its own RNG fork and uses fixed episodes, so
it does not perturb training.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

# torch, numpy and whatever imports them (fastmaml.checkpoint, fastmaml.models, the engine) are
# imported in the functions that use them: `fastmaml train --help` and argument errors answer
# without the seconds that importing torch takes (tests/test_cli_startup.py).
from . import configs, fsutil, metrics_file, run_info
from .configs import Config, UserError
from .run_guard import RunFolderGuard

if TYPE_CHECKING:
    import torch

COMMAND_HELP = "meta-train a config (writes RUN_DIR: config.json, metrics.jsonl, checkpoint.pt)"

# checkpoint.FILENAME and checkpoint.PREV_FILENAME spelled out (fastmaml.checkpoint imports torch;
# tests/test_cli_startup.py checks that they agree)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "eval.json", "checkpoint.prev.pt", run_info.FILENAME)
RUN_FOLDERS = ("plots",)


class TrainingError(UserError):
    """Training cannot go on (for example the loss became non-finite); exit status 1."""

    code = 1


def add_arguments(p) -> None:
    p.add_argument("config", help="a built-in config (see `fastmaml configs`) or a config .json file")
    p.add_argument("--data", metavar="DIR", help="the data folder (holding omniglot/, miniimagenet/); default: "
                   "with --resume the one the run trained on (RUN_DIR/run.json), else $FASTMAML_DATA, then "
                   "~/.cache/fastmaml")
    p.add_argument("--out", metavar="RUN_DIR", help="the run folder (default: runs/<config>)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings of the config, e.g. --set iterations=1000 seed=3")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in RUN_DIR from its checkpoint; start it if there is none, and do "
                            "nothing if it is finished (so the same command can be run again)")
    group.add_argument("--force", action="store_true",
                       help="delete the run in RUN_DIR (its config, metrics, checkpoints, eval, plots; it says so) "
                            "and start over. Without --resume or --force, a folder holding a run is refused")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to train (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from . import distributed_args

    distributed_args.add_arguments(p)  # --nproc, --dist-timeout (issue 12)


# -- shared builders (also used by eval and plot) -----------------------------------------------------

def resolve_device(name: Optional[str]) -> torch.device:
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available (this torch build or machine has no GPU); use --device cpu")
    return torch.device(name)


def set_threads(n: Optional[int]) -> None:
    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads {n}: expected a positive int")
    import torch

    torch.set_num_threads(n)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A meta-step allocates and frees tensors of the ``[T, P]`` layout (31.6 MB for the paper's MLP at
    T = 32) many times. By default glibc serves each from a fresh ``mmap`` (or trims the heap after it
    is freed), so the first write to every page faults: about 10,000-18,000 page faults and 25-38 ms
    of system time per ``omniglot-mlp-5w1s`` meta-step on the 2-vCPU machine, a quarter of the step.
    Serving every block from the heap (``M_MMAP_MAX = 0``) and never trimming it
    (``M_TRIM_THRESHOLD``) reuses the same pages from step to step. The process keeps its peak heap
    (a training process reaches its peak every step anyway); nothing computed changes.
    ``FASTMAML_MALLOC=default`` leaves malloc alone. True when the settings were applied (Linux with
    glibc), False elsewhere.
    """
    if os.environ.get("FASTMAML_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_learner(config: Config, device: torch.device):
    """The config's model (initialized from ``seed``) wrapped in ``fastmaml.MAML``, and Adam."""
    import torch

    from . import models
    from .maml import MAML

    if config["kernels"] != "auto":
        from . import kernels

        try:
            kernels.resolve(device, config["kernels"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"kernels={config['kernels']}: {e}") from None
    if config["cuda_graph"] and device.type != "cuda":
        raise UserError(f"cuda_graph=true needs a CUDA device (--device cuda), not {device}")
    seed_everything(config["seed"])
    model = models.build(config).to(device)
    if config.get("algorithm", "maml") != "maml":  # ANIL, Reptile, iMAML, MAML++ (issue 14)
        from .algorithms import build as algorithms

        try:
            learner = algorithms.make_learner(config, model)
        except (ValueError, TypeError) as e:
            raise UserError(f"config {config['config']}: {_first_line(e)}") from None
        return learner, algorithms.make_optimizer(config, learner.parameters())
    learner = MAML(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                   first_order=config["first_order"], learn_lr=config["learn_lr"], memory=config["memory"],
                   kernels=config["kernels"], batching=config["batching"], cuda_graph=config["cuda_graph"])
    opt = torch.optim.Adam(learner.parameters(), lr=config["meta_lr"])
    return learner, opt


def make_dataset(config: Config, split: str, root: Optional[str], device: torch.device,
                 queries: Optional[int] = None, seed: Optional[int] = None, can_set: bool = True):
    """The task sampler of ``config`` for ``split`` ('train', 'val', 'test'); ``can_set``: the
    command takes ``--set`` (the data-not-found message suggests ``--set download=true`` then)."""
    try:
        from . import data
    except ImportError as e:  # pragma: no cover - the data layer is part of the package
        raise UserError(f"the data layer fastmaml.data cannot be imported: {e}") from None
    queries = config["queries"] if queries is None else queries
    seed = config["seed"] if seed is None else seed
    dataset = config["dataset"]
    try:
        if dataset == "sinusoid":
            return data.Sinusoid(shots=config["shots"], queries=queries, device=device, seed=seed)
        if dataset == "omniglot":
            return data.Omniglot(root=root, split=split, ways=config["ways"], shots=config["shots"], queries=queries,
                                 image_size=config["image_size"], split_scheme=config["split_scheme"],
                                 rotations=config["rotations"], device=device, download=config["download"],
                                 seed=seed)
        if dataset == "miniimagenet":
            kw: Dict[str, Any] = {}
            params = inspect.signature(data.MiniImageNet).parameters
            if "download" in params:
                kw["download"] = config["download"]
            if "image_size" in params:
                kw["image_size"] = config["image_size"]
            return data.MiniImageNet(root, split=split, ways=config["ways"], shots=config["shots"], queries=queries,
                                     device=device, seed=seed, **kw)
    except data.DataNotFound as e:
        where = " or ".join(e.places)
        detail = f" ({e.detail})" if e.detail else ""
        fix = (f"add --data DIR (the folder holding {dataset}/)"
               + (" or --set download=true to fetch it" if dataset == "omniglot" and "download" in config and can_set
                  else "" if dataset == "omniglot" else " (it is not downloaded automatically)"))
        raise UserError(f"{dataset} data not found: no {e.expected} in {where}{detail}. Fix: {fix}") from None
    except data.PackageFileMissing as e:
        raise UserError(str(e)) from None
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load the {dataset} {split} data: {_first_line(e)}") from None
    raise UserError(f"unknown dataset {dataset!r}")


def check_writable(folder: Path, what: str, fix: str) -> None:
    """A one-line :class:`UserError` when files cannot be created in ``folder`` (checked for real,
    before any work is done)."""
    problem = fsutil.writable_problem(folder)
    if problem is not None:
        raise UserError(f"cannot write {what} to {folder}: {problem}; {fix}")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else text[:400] + "..."


def fixed_episodes(ds, n: int, batch: int, seed: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """``n`` episodes fixed by ``seed`` (the same every call, whatever the sampler's state), ``batch``
    at a time."""
    return ds.episodes(n, batch=batch, seed=seed)


# -- the run folder ---------------------------------------------------------------------------------

def default_run_dir(config: Config) -> Path:
    return Path("runs") / config["config"]


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    from . import checkpoint as ckpt_mod

    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    ckpt_mod.atomic_write_bytes(path, lambda f: f.write(text.encode()))


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / f).exists() for f in RUN_FILES[:3])


def describe_differences(diffs, old_label: str, new_label: str) -> str:
    return "; ".join(f"{k}: {configs.format_value(a)} ({old_label}) vs {configs.format_value(b)} ({new_label})"
                     for k, a, b in diffs)


RESUMABLE = tuple(k for k, spec in configs.KEYS.items() if spec.resumable)


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The well-formed lines of a metrics file (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("iter"), int):
                    out.append(obj)
    except FileNotFoundError:
        pass
    return out


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep only the metric lines of iterations <= ``iteration``, less the partial lines a stop wrote
    (the resumed run goes on with their window), atomically."""
    keep = [m for m in read_metrics(path) if m["iter"] <= iteration and not m.get("partial")]
    text = "".join(json.dumps(m) + "\n" for m in keep)
    from . import checkpoint as ckpt_mod

    ckpt_mod.atomic_write_bytes(path, lambda f: f.write(text.encode()))


# -- the loop ----------------------------------------------------------------------------------------

class _StopRequest:
    """SIGINT / SIGTERM: finish the current iteration, checkpoint, stop. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def main(args) -> int:
    config = configs.resolve(args.config, args.overrides)  # first: a mistake there is reported at once
    args.remembered_data = None
    if args.data is None and args.resume:  # the data folder the run trained on (fastmaml/run_info.py)
        args.data = args.remembered_data = run_info.data_folder(Path(args.out) if args.out
                                                                else default_run_dir(config))
    from . import distributed

    keep_freed_memory()  # no page faults on the meta-step's large temporaries (see there)
    if distributed.wanted(args):  # --nproc N, or a rank started by torchrun: see fastmaml/distributed.py
        return distributed.train_main(args)
    device = resolve_device(args.device)
    set_threads(args.threads)
    run_dir = Path(args.out) if args.out else default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: exists and is not a folder")
    check_writable(run_dir, "the run", "choose another folder with --out (or make this one writable)")
    made = _make_dirs(run_dir)
    lock = fsutil.RunLock(run_dir)
    try:
        lock.acquire()
    except fsutil.LockHeld as e:
        _remove_made(made)
        who = f"pid {e.pid}" if e.pid is not None else "another process"
        raise UserError(f"{run_dir} is in use by another fastmaml train ({who}, lock file {e.path}); wait for it "
                        "to end or stop it, or use --out for another folder") from None
    try:
        return _main_locked(args, config, device, run_dir)
    finally:
        lock.release()
        _remove_made(made)


def _make_dirs(path: Path) -> List[Path]:
    """Create ``path`` and its missing parents; the folders created, deepest first."""
    made = []
    p = path.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(made: List[Path]) -> None:
    """Remove the folders :func:`_make_dirs` created, where they are still empty (a refused start
    leaves no trace)."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def resume_command(args, run_dir: Path, data_root: Optional[str]) -> str:
    """The command that continues this run, as it must be typed: the config, the folder, the data
    folder actually used (even when it came from $FASTMAML_DATA), the device, threads and --set."""
    parts = ["fastmaml", "train", args.config, "--out", str(run_dir)]
    if data_root is not None:
        parts += ["--data", os.path.abspath(data_root)]
    if args.device:
        parts += ["--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.overrides:
        parts += ["--set", *args.overrides]
    from . import distributed

    if distributed.world_size() > 1:
        parts += ["--nproc", str(distributed.world_size())]
    parts.append("--resume")
    return " ".join(shlex.quote(p) for p in parts)


def _main_locked(args, config: Config, device: torch.device, run_dir: Path) -> int:
    from . import checkpoint as ckpt_mod

    ckpt_path = run_dir / ckpt_mod.FILENAME
    for name in RUN_FILES:  # e.g. a folder named checkpoint.pt: say so now, under its own name
        entry = run_dir / name
        if entry.exists() and not entry.is_file():
            raise UserError(f"{entry} is not a file (a folder?) but training reads and writes its {name} there; "
                            "remove or rename it, or use --out for another folder")

    # 1. Decide what to do with the run folder; read and check everything before writing anything.
    state = None
    fell_back = False
    if holds_run(run_dir) and not args.force:
        old_config = None
        if ckpt_path.exists() or ckpt_mod.previous_path(ckpt_path).exists():
            if not args.resume:
                old = read_json(run_dir / "config.json")
                _refuse_existing(run_dir, old, config)
            state, used, note = ckpt_mod.load_latest(ckpt_path)
            if note is not None:
                print(f"fastmaml: warning: {note}", file=sys.stderr)
                fell_back = True
            old_config = state["config"]
            label = "checkpoint"
        else:
            old_config = read_json(run_dir / "config.json")
            label = "run folder"
            if not args.resume:
                _refuse_existing(run_dir, old_config, config)
        if old_config is not None:
            diffs = configs.differences(old_config, config, ignore=RESUMABLE)
            if diffs:
                raise UserError(f"{run_dir} holds a run of a different config; refusing to resume: "
                                f"{describe_differences(diffs, label, 'requested')}. Use --force to start over "
                                "or --out for another folder")
        if state is not None and state["iteration"] >= config["iterations"]:
            print(f"{run_dir} is already trained to iteration {state['iteration']} (iterations="
                  f"{config['iterations']}); nothing to do (raise it with --set iterations=N to go on)")
            return 0

    learner, opt = build_learner(config, device)
    if state is not None:
        ckpt_mod.check_compatible(state, learner.model, learner.inner_lr, ckpt_path)
        ckpt_mod.check_optimizer(state, opt, ckpt_path)
        from . import distributed

        distributed.check_world_size(state, ckpt_path)
    try:
        train_ds = make_dataset(config, "train", args.data, device)
        val_ds = None
        if config["val_every"] > 0:
            val_ds = make_dataset(config, "val", args.data, device, queries=config["eval_queries"],
                                  seed=config["val_seed"])
    except UserError as e:
        if getattr(args, "remembered_data", None) is None:
            raise
        raise run_info.with_data_origin(e, args.data, run_dir) from None
    if state is not None:
        try:
            train_ds.load_state_dict(state["rng"]["sampler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ckpt_mod.CheckpointError(f"checkpoint {ckpt_path}: the sampler state does not fit this data "
                                           f"({_first_line(e)}); it was not loaded") from None
    # the data folder as the user named it (not the omniglot/ folder inside it): remembered in run.json
    # and printed in the resume command
    data_folder = run_info.user_data_folder(
        args.data, getattr(train_ds, "root", None) if config["dataset"] != "sinusoid" else None, config["dataset"])
    command = resume_command(args, run_dir, data_folder)

    # 2. Apply the checkpoint (everything was validated above) and set up the run folder.
    start = 0
    progress_state: Dict[str, Any] = {"elapsed": 0.0, "window": {"loss": 0.0, "accuracy": 0.0, "count": 0}}
    if state is not None:
        learner.model.load_state_dict(state["model"])
        learner.inner_lr.load_state_dict(state["inner_lr"])
        opt.load_state_dict(state["optimizer"])
        ckpt_mod.restore_rng(state["rng"])
        start = state["iteration"]
        progress_state = state["progress"]
    if args.force and run_dir.exists():
        if holds_run(run_dir):
            print(f"fastmaml: --force: deleting the run in {run_dir} (its config, metrics, checkpoints, eval and "
                  "plots) to start over", file=sys.stderr)
        for f in RUN_FILES:
            try:
                (run_dir / f).unlink()
            except FileNotFoundError:
                pass
        for d in RUN_FOLDERS:
            shutil.rmtree(run_dir / d, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_mod.remove_stale_temporaries(run_dir)
    ckpt_mod.remove_stale_temporaries(run_dir, ckpt_mod.PREV_FILENAME)
    write_json(run_dir / "config.json", config)
    if data_folder is not None:
        run_info.record(run_dir, data_folder)
    # the lines up to the checkpoint; damage to them is reported (and the damaged file kept), not dropped
    note = metrics_file.prepare_resume(run_dir / "metrics.jsonl", start,
                                       None if state is None else state["progress"].get("metrics"))
    if note is not None:
        print(f"fastmaml: warning: {note}", file=sys.stderr)

    from . import distributed

    if distributed.current() is not None:
        distributed.current().release(state)  # the other ranks start training from the same state
    return _loop(config, args, learner, opt, train_ds, val_ds, run_dir, start, progress_state, device, command,
                 keep_previous=not fell_back)


def log_interval(config: Config) -> int:
    """Iterations between two training lines: ``log_every``, or for a run of fewer iterations than
    that, a tenth of the run (at least 1), so that a short run (``--set iterations=30`` of a config
    that logs every 100) still draws a curve. The last iteration is always logged."""
    every, iterations = config["log_every"], config["iterations"]
    return every if iterations >= every else max(1, iterations // 10)


def _refuse_existing(run_dir: Path, old: Optional[Config], new: Config) -> None:
    if old is not None:
        diffs = configs.differences(old, new, ignore=RESUMABLE)
        if diffs:
            raise UserError(f"{run_dir} already holds a different run ({describe_differences(diffs, 'there', 'requested')}); "
                            "pass --force to delete it and start over, or --out for another folder")
    raise UserError(f"{run_dir} already holds a run of this config; pass --resume to continue it, "
                    "--force to delete it and start over, or --out for another folder")


def _loop(config, args, learner, opt, train_ds, val_ds, run_dir: Path, start: int, progress_state, device,
          command: str, keep_previous: bool = True) -> int:
    from . import checkpoint as ckpt_mod
    from . import distributed
    from .progress import Progress

    ddp = distributed.current()  # None in a 1-process run
    writer = ddp is None or ddp.writer  # rank 0 alone writes metrics, checkpoints and the progress bar
    if ddp is not None:
        train_ds = distributed.SliceSampler(train_ds, ddp, config["meta_batch"])
    iterations = config["iterations"]
    classification = config["dataset"] != "sinusoid"
    params = [p for p in learner.parameters() if p.requires_grad]
    clip = config["grad_clip"]
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_path = run_dir / ckpt_mod.FILENAME
    window = dict(progress_state["window"])
    elapsed_before = float(progress_state["elapsed"])
    t0 = time.perf_counter()
    last_ckpt = start
    bar = Progress(iterations, initial=start, desc=config["config"], tasks_per_step=config["meta_batch"],
                   enabled=not args.quiet and writer)
    if start > 0 and writer:
        bar.write(f"resuming {run_dir} at iteration {start}/{iterations}")
    if writer and not args.quiet:  # which engine path runs, and for the generic one which module made it
        bar.write(f"engine path: {learner.execution_path}")
    log_every = log_interval(config)
    if writer and not args.quiet and log_every != config["log_every"]:
        bar.write(f"a training line every {log_every} iterations (log_every={config['log_every']} is more than "
                  f"the run's {iterations} iterations)")
    metrics = metrics_file.MetricsWriter(metrics_path if writer else None)
    # the run folder deleted, moved or replaced meanwhile: stop rather than write into a deleted file
    # or recreate a folder holding a checkpoint alone (checked before each line and each checkpoint)
    guard = RunFolderGuard(run_dir, metrics_path, metrics.fileno(), run_dir / "config.json") if writer else None

    def check_run_folder(it: int) -> None:
        problem = guard.problem() if guard is not None else None
        if problem is None:
            return
        if guard.folder_gone() or not ckpt_path.is_file():
            fix = "nothing of this run is left to resume; start it again if you meant to keep it"
        elif last_ckpt > 0:
            fix = f"its last checkpoint (iteration {last_ckpt}) is still there: continue with {command}"
        else:
            fix = "no checkpoint was written yet: start it again (with --force)"
        raise TrainingError(f"{problem} during training, at iteration {it}; training stopped without writing "
                            f"anything more into {run_dir}: {fix}")

    def log(obj: Dict[str, Any]) -> None:
        check_run_folder(obj["iter"])
        metrics.write(obj)

    rotate = [keep_previous]  # False only right after falling back from a damaged latest checkpoint

    def save(iteration: int) -> None:
        if not writer:
            return
        check_run_folder(iteration)
        metrics.sync()
        keep, rotate[0] = rotate[0], True
        ckpt_mod.save(ckpt_path, keep_previous=keep, checkpoint={
            "format": ckpt_mod.FORMAT, "version": ckpt_mod.VERSION, "iteration": iteration,
            "config": dict(config), "model": learner.model.state_dict(),
            "inner_lr": learner.inner_lr.state_dict(), "optimizer": opt.state_dict(),
            "rng": ckpt_mod.capture_rng(train_ds.state_dict()),
            "progress": {"elapsed": elapsed_before + time.perf_counter() - t0, "window": dict(window),
                         "metrics": metrics.record()},
            "device": str(device), "world_size": distributed.world_size(),
        })

    def train_line(it: int, partial: bool = False) -> None:
        n = window["count"]
        line: Dict[str, Any] = {"split": "train", "iter": it, "loss": window["loss"] / n}
        if classification:
            line["accuracy"] = window["accuracy"] / n
        now = time.perf_counter()
        line["tasks_per_s"] = round(n * config["meta_batch"] / max(now - window_start, 1e-9), 3)
        line["elapsed"] = round(elapsed_before + now - t0, 3)
        if partial:
            line["partial"] = True
        log(line)

    from .algorithms.build import make_schedule

    schedule = make_schedule(config)  # meta-lr schedule, MAML++ annealing; None for the plain configs
    it = start
    done = start  # the last iteration whose metrics are in the window
    logged = start  # the last iteration a training line covers
    finished = False
    window_start = time.perf_counter()
    try:
        with _StopRequest() as stop:
            for it in range(start + 1, iterations + 1):
                sx, sy, qx, qy = train_ds.sample(config["meta_batch"])
                opt.zero_grad(set_to_none=True)
                if schedule is not None:  # a function of the iteration (resumes exactly)
                    schedule(learner, opt, it)
                try:
                    out = learner.meta_step(sx, sy, qx, qy)
                except FloatingPointError as e:
                    kept = (f"the last checkpoint ({ckpt_path}, iteration {last_ckpt}) is intact" if last_ckpt > 0
                            else f"no checkpoint was written yet (the first is due at iteration "
                                 f"{min(config['checkpoint_every'], iterations)}), so there is nothing to resume")
                    raise TrainingError(f"training diverged at iteration {it}: {_first_line(e)}; {kept}") from None
                if ddp is not None:  # one all-reduce: the meta-gradient of the whole meta-batch, global metrics
                    out = ddp.sync(learner, out, stop, it, train_ds)
                if clip > 0:
                    for p in params:
                        if p.grad is not None:
                            p.grad.clamp_(-clip, clip)
                opt.step()
                loss = float(out.loss)
                acc = float(out.task_accuracy.mean()) if out.task_accuracy is not None else None
                window["loss"] += loss
                window["accuracy"] += acc if acc is not None else 0.0
                window["count"] += 1
                done = it
                if it % log_every == 0 or it == iterations:
                    train_line(it)
                    logged = it
                    window_start = time.perf_counter()
                    window = {"loss": 0.0, "accuracy": 0.0, "count": 0}
                if val_ds is not None and (it % config["val_every"] == 0 or it == iterations):
                    log(_validate(learner, val_ds, config, it, classification))
                    window_start = time.perf_counter()  # tasks_per_s measures training alone
                bar.update(it, loss=loss, accuracy=acc)
                if stop.requested and logged < it and window["count"] > 0:
                    train_line(it, partial=True)  # the metrics since the last line (dropped on resume)
                    logged = it
                if it % config["checkpoint_every"] == 0 or it == iterations or stop.requested:
                    save(it)
                    last_ckpt = it
                if stop.requested:
                    bar.close()
                    if writer:
                            print(f"fastmaml: stopped at iteration {it}/{iterations}; checkpoint saved. "
                              f"Continue with: {command}", file=sys.stderr)
                    return 130
            finished = True
    finally:
        if not finished and logged < done and window["count"] > 0 and not metrics.closed:
            try:
                train_line(done, partial=True)  # training stopped (an error): its last metrics
            except (OSError, ValueError, TrainingError):
                pass
        metrics.close()
    bar.close()
    if ddp is not None:
        ddp.final_check(learner)
        if not writer:
            return 0
    summary = f"trained {config['config']} to iteration {iterations} in {run_dir}"
    last_val = [m for m in read_metrics(metrics_path) if m.get("split") == "val"]
    if last_val:
        v = last_val[-1]
        if classification:
            summary += f"; validation accuracy after {config['test_steps']} inner steps: {100 * v['accuracy']:.2f}%"
        else:
            mse = format(v["loss"], "#.3g").rstrip(".")  # 3.00, not 3
            summary += f"; validation MSE after {config['test_steps']} inner steps: {mse}"
    print(summary)
    return 0


def _validate(learner, val_ds, config: Config, it: int, classification: bool) -> Dict[str, Any]:
    import torch

    from .evaluate import mean_ci95, run_episodes

    with torch.random.fork_rng(devices=[]):
        episodes = fixed_episodes(val_ds, config["val_episodes"], config["eval_batch"], config["val_seed"])
        from . import distributed

        if distributed.current() is not None:  # each rank a share of the episodes, gathered in order
            run_episodes = distributed.current().run_episodes
        losses, accs = run_episodes(learner, episodes, config["test_steps"], classification)
    loss, loss_ci = mean_ci95(losses)
    line: Dict[str, Any] = {"split": "val", "iter": it, "loss": loss, "loss_ci95": loss_ci}
    if classification:
        acc, acc_ci = mean_ci95(accs)
        line.update(accuracy=acc, accuracy_ci95=acc_ci)
    line.update(steps=config["test_steps"], episodes=len(losses))
    return line
