"""``fastmaml train``: the meta-training loop, with metrics, validation, checkpoints and exact resume.

The run folder (default ``runs/<config>``) holds:

* ``config.json``: the resolved config;
* ``metrics.jsonl``: one JSON object per line: ``{"split": "train", "iter", "loss", "accuracy",
  "tasks_per_s", "elapsed"}`` every ``log_every`` iterations (a tenth of the run when it is shorter:
  :func:`log_interval`) and at the last one (means over the iterations since the
  previous line) and ``{"split": "val", "iter", "loss", "loss_ci95", "accuracy", "accuracy_ci95",
  "steps", "episodes"}`` every ``val_every`` iterations (fixed validation episodes);
* ``checkpoint.pt``: every ``checkpoint_every`` iterations and at the end (see :mod:`fastmaml.app.checkpoint`),
  and ``checkpoint.prev.pt``, the one before it, which ``--resume``, ``eval`` and ``plot`` fall back to
  (saying so) when the latest is damaged;
* ``run.json``: the data folder the run reads (Omniglot, mini-ImageNet), which ``eval`` and ``--resume``
  use when not given ``--data`` (:mod:`fastmaml.app.run_info`);
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
damaged (each checkpoint records the file's size and hash, :mod:`fastmaml.app.metrics_file`) are reported
on resume, and the damaged file is kept as ``metrics.jsonl.damaged-<time>``. The run folder deleted,
moved or replaced during training (or its ``metrics.jsonl`` or ``config.json``) stops training with an
error at the next metrics line or checkpoint, recreating nothing (:mod:`fastmaml.app.run_guard`).

Iteration ``i`` (1-based) does, in order: sample a task batch, meta-step, (clip), Adam step; a metrics
line; validation; the checkpoint. Validation runs under its own RNG fork and uses fixed episodes, so
it does not perturb training.

This module is the command: it checks the run folder and decides what to do with it (start, resume,
refuse, start over), then hands over to the loop (:mod:`fastmaml.app.training_loop`). The learner and
the data come from :mod:`fastmaml.app.run_setup`, the folder's files from :mod:`fastmaml.app.run_folder`;
``--nproc`` and torchrun go through :mod:`fastmaml.app.distributed_train`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

# torch, numpy and whatever imports them (fastmaml.app.checkpoint, the training loop, the distributed
# launcher, the library) are imported in the functions that use them: `fastmaml train --help` and
# argument errors answer without the seconds that importing torch takes (tests/test_cli_startup.py).
from .. import fsutil
from . import configs, distributed_args, metrics_file, run_info
from .configs import Config
# TrainingError: also fastmaml.app.train.TrainingError, where it was defined before issue 23
from .errors import TrainingError, UserError, first_line  # noqa: F401
from .run_setup import build_learner, keep_freed_memory, make_dataset, resolve_device, set_threads
from .run_folder import (RESUMABLE, RUN_FILES, RUN_FOLDERS, check_writable, default_run_dir, describe_differences,
                         holds_run, read_json, write_json)

if TYPE_CHECKING:
    import torch

COMMAND_HELP = "meta-train a config (writes RUN_DIR: config.json, metrics.jsonl, checkpoint.pt)"


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
    distributed_args.add_arguments(p)  # --nproc, --dist-timeout (issue 12)


def main(args) -> int:
    config = configs.resolve(args.config, args.overrides)  # first: a mistake there is reported at once
    args.remembered_data = None
    if args.data is None and args.resume:  # the data folder the run trained on (fastmaml/run_info.py)
        args.data = args.remembered_data = run_info.data_folder(Path(args.out) if args.out
                                                                else default_run_dir(config))
    from . import distributed_train

    keep_freed_memory()  # no page faults on the meta-step's large temporaries (see there)
    if distributed_train.wanted(args):  # --nproc N, or a rank started by torchrun (see there)
        return distributed_train.train_main(args, main)
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
    from . import rank_context

    if rank_context.world_size() > 1:
        parts += ["--nproc", str(rank_context.world_size())]
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
        from . import rank_context

        rank_context.check_world_size(state, ckpt_path)
    try:
        train_ds = make_dataset(config, "train", args.data, device)
        val_ds = None
        if config["val_every"] > 0:
            val_ds = make_dataset(config, "val", args.data, device, queries=config["eval_queries"],
                                  seed=config["val_seed"], task_rotations="class")
    except UserError as e:
        if getattr(args, "remembered_data", None) is None:
            raise
        raise run_info.with_data_origin(e, args.data, run_dir) from None
    if state is not None:
        try:
            train_ds.load_state_dict(state["rng"]["sampler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ckpt_mod.CheckpointError(f"checkpoint {ckpt_path}: the sampler state does not fit this data "
                                           f"({first_line(e)}); it was not loaded") from None
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

    from . import rank_context, training_loop

    if rank_context.current() is not None:
        rank_context.current().release(state)  # the other ranks start training from the same state
    return training_loop.run(config, args, learner, opt, train_ds, val_ds, run_dir, start, progress_state, device,
                             command, keep_previous=not fell_back)


def _refuse_existing(run_dir: Path, old: Optional[Config], new: Config) -> None:
    if old is not None:
        diffs = configs.differences(old, new, ignore=RESUMABLE)
        if diffs:
            raise UserError(f"{run_dir} already holds a different run ({describe_differences(diffs, 'there', 'requested')}); "
                            "pass --force to delete it and start over, or --out for another folder")
    raise UserError(f"{run_dir} already holds a run of this config; pass --resume to continue it, "
                    "--force to delete it and start over, or --out for another folder")
