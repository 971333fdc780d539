"""The meta-training loop of ``fastmaml train``: iterations, metrics lines, validation, checkpoints.

Iteration ``i`` (1-based) does, in order: sample a task batch, meta-step, (clip), the optimizer step;
a metrics line every :func:`log_interval` iterations; validation every ``val_every`` (fixed episodes,
under its own RNG fork, so that it does not perturb training); the checkpoint every
``checkpoint_every``. SIGINT / SIGTERM finish the iteration, checkpoint and stop
(:class:`StopRequest`). In a distributed run (:mod:`fastmaml.app.rank_context`) every rank runs this
loop on its slice of the meta-batch and rank 0 alone writes. The run folder and the resume logic are
:mod:`fastmaml.app.train`'s.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

from ..algorithms.build import make_schedule
from ..distributed import SliceSampler
from . import checkpoint as ckpt_mod
from . import metrics_file, rank_context
from .configs import Config
from .episodes import fixed_episodes, mean_ci95, run_episodes, training_passes
from .errors import TrainingError, first_line
from .progress import Progress
from .run_folder import read_metrics
from .run_guard import RunFolderGuard

__all__ = ["run", "validate", "log_interval", "StopRequest"]


class StopRequest:
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


def log_interval(config: Config) -> int:
    """Iterations between two training lines: ``log_every``, or for a run of fewer iterations than
    that, a tenth of the run (at least 1), so that a short run (``--set iterations=30`` of a config
    that logs every 100) still draws a curve. The last iteration is always logged."""
    every, iterations = config["log_every"], config["iterations"]
    return every if iterations >= every else max(1, iterations // 10)


def run(config, args, learner, opt, train_ds, val_ds, run_dir: Path, start: int, progress_state, device,
        command: str, keep_previous: bool = True) -> int:
    """Train ``learner`` (with ``opt``) from iteration ``start`` to ``config["iterations"]``, writing the
    metrics lines and checkpoints of ``run_dir`` (rank 0 alone when distributed); 0 when done, 130
    when stopped by SIGINT/SIGTERM after a checkpoint. ``progress_state``: the elapsed time and the
    metric window saved in the checkpoint resumed from. ``command``: the resume command to print.
    ``keep_previous=False`` right after falling back from a damaged latest checkpoint (it is not
    rotated into ``checkpoint.prev.pt``)."""
    ddp = rank_context.current()  # None in a 1-process run
    writer = ddp is None or ddp.writer  # rank 0 alone writes metrics, checkpoints and the progress bar
    if ddp is not None:
        train_ds = SliceSampler(train_ds, ddp, config["meta_batch"])
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
            "device": str(device), "world_size": rank_context.world_size(),
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

    schedule = make_schedule(config)  # meta-lr schedule, MAML++ annealing; None for the plain configs
    it = start
    done = start  # the last iteration whose metrics are in the window
    logged = start  # the last iteration a training line covers
    finished = False
    window_start = time.perf_counter()
    try:
        with StopRequest() as stop:
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
                    raise TrainingError(f"training diverged at iteration {it}: {first_line(e)}; {kept}") from None
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
                    log(validate(learner, val_ds, config, it, classification))
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


def validate(learner, val_ds, config: Config, it: int, classification: bool) -> Dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        episodes = fixed_episodes(val_ds, config["val_episodes"], config["eval_batch"], config["val_seed"])
        run_all = run_episodes
        if rank_context.current() is not None:  # each rank a share of the episodes, gathered in order
            run_all = rank_context.current().run_episodes
        # the queries in the passes of meta-training, as `fastmaml eval` does (BatchNorm's batch statistics)
        per_pass = training_passes(config, config["eval_queries"]) if classification else None
        losses, accs = run_all(learner, episodes, config["test_steps"], classification,
                               config.get("ways"), per_pass)
    loss, loss_ci = mean_ci95(losses)
    line: Dict[str, Any] = {"split": "val", "iter": it, "loss": loss, "loss_ci95": loss_ci}
    if classification:
        acc, acc_ci = mean_ci95(accs)
        line.update(accuracy=acc, accuracy_ci95=acc_ci)
    line.update(steps=config["test_steps"], episodes=len(losses))
    return line
