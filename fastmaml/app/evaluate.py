"""``fastmaml eval``: the paper's evaluation of a trained run.

Classification: adapt to each of ``--episodes`` (default 600) test episodes fixed by the config's
``eval_seed`` with ``--steps`` inner steps (default: the config's ``test_steps``, 10), and report the
mean query accuracy with its 95% confidence interval ``1.96 * s / sqrt(n)``, where ``s`` is the
*sample* standard deviation of the per-episode accuracies (``ddof=1``; the paper's code uses
``np.std``, ``ddof=0``: the two differ by a factor sqrt(n / (n - 1)), 0.08% at n = 600).

BatchNorm with batch statistics (every built-in Omniglot and mini-ImageNet network) normalizes the
query images with the statistics of the images in the same forward pass, so the accuracy depends on
how many go through at once. ``--queries-per-pass K`` sends the queries through K per class at a
time. The default is the config's ``queries``: the batch statistics the run was meta-trained with,
which is also what the MAML code's evaluation does (its test episodes have K queries per class, the
training's). ``--queries-per-pass all`` sends every query of an episode through in one pass (the
default before issue 22's runs: 5-way 1-shot conv4 reads 98.01 % that way, 99.33 % in passes of 1).

Sinusoid: the mean squared error on held-out tasks (one task = one episode) after 0, 1, ..., ``steps``
inner steps, each with its 95% confidence interval.

Writes ``eval.json`` into the run folder and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

# numpy, torch and fastmaml.app.checkpoint are imported in the functions that use them: `fastmaml eval
# --help` and argument errors answer without importing torch (tests/test_cli_startup.py)
from . import configs, run_info
from .configs import Config
# run_episodes and query_passes: also importable from here, where they were defined before validation shared them
from .episodes import fixed_episodes, mean_ci95, query_passes, run_episodes, training_passes  # noqa: F401
from .errors import UserError
from .run_setup import build_learner, keep_freed_memory, make_dataset, resolve_device, set_threads
from .progress import Progress
from .run_folder import RESUMABLE, check_writable, describe_differences, read_json, write_json
from .termination import sigterm_raises

if TYPE_CHECKING:
    import torch

COMMAND_HELP = "evaluate a trained run on fixed test episodes (mean and 95% CI); writes eval.json"

CI_NOTE = "95% confidence interval: 1.96 * sample std (ddof=1) / sqrt(n) over episodes"

__all__ = ["mean_ci95", "load_run", "restore_learner", "evaluate", "resolve_queries_per_pass", "main"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def _per_pass(text: str):
    """``--queries-per-pass``: a positive int, or ``all``."""
    if text == "all":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}") from None


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN_DIR|CHECKPOINT", help="a run folder or a checkpoint file")
    p.add_argument("--episodes", type=_positive_int, default=None,
                   help="test episodes (tasks for sinusoid); default: the config's eval_episodes (600)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="inner steps at test time; default: the config's test_steps (10)")
    p.add_argument("--data", metavar="DIR", help="the data folder, holding omniglot/ or miniimagenet/ (default: "
                   "the one the run trained on, remembered in RUN_DIR/run.json; then $FASTMAML_DATA, then "
                   "~/.cache/fastmaml)")
    p.add_argument("--queries", type=_positive_int, default=None,
                   help="query examples per class (points for sinusoid); default: the config's eval_queries")
    p.add_argument("--queries-per-pass", type=_per_pass, default=None, metavar="K|all",
                   help="classification: send the queries through the adapted network K per class at a time, so "
                   "BatchNorm's batch statistics see N*K query images (K must divide --queries); 'all': every "
                   "query in one pass; default: the config's queries, the passes the run was meta-trained with")
    p.add_argument("--task-rotations", choices=("class", "character"), default=None,
                   help="Omniglot: episodes of N distinct character-rotation classes (class, the default) or of N "
                   "distinct characters, each at its own random rotation (character: the MAML code's test tasks)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which classes to test on")
    p.add_argument("--batch", type=_positive_int, default=None, help="episodes at a time (default: eval_batch)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# -- loading ---------------------------------------------------------------------------------------

def load_run(path: str) -> Tuple[Dict[str, Any], Path, Path]:
    """(checkpoint, run folder, checkpoint path) for a run folder or a checkpoint file. A damaged
    latest checkpoint falls back to ``checkpoint.prev.pt``, with a warning on stderr."""
    from . import checkpoint as ckpt_mod

    p = Path(path)
    if p.is_dir():
        ckpt_path = p / ckpt_mod.FILENAME
        if not ckpt_path.exists() and not ckpt_mod.previous_path(ckpt_path).exists():
            raise UserError(f"{p} holds no checkpoint ({ckpt_mod.FILENAME}); train it first with fastmaml train")
    elif p.exists():
        ckpt_path = p
    else:
        raise UserError(f"{p}: no such run folder or checkpoint")
    ckpt, used, note = ckpt_mod.load_latest(ckpt_path)
    if note is not None:
        print(f"fastmaml: warning: {note}", file=sys.stderr)
    check_run_config(ckpt, used)
    return ckpt, ckpt_path.parent, used


def check_run_config(ckpt: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another config than its run folder's ``config.json`` (a copied or
    mixed-up file), as ``fastmaml train --resume`` does: the differences that matter to a run (all
    keys but those a resume may change, such as ``iterations``) are named. Nothing to compare when
    the folder has no readable ``config.json``."""
    folder_config = read_json(path.parent / "config.json")
    if folder_config is None:
        return
    diffs = configs.differences(folder_config, ckpt["config"], ignore=RESUMABLE)
    if diffs:
        raise UserError(f"{path} is a checkpoint of a different config than its run folder's config.json; refusing "
                        f"to use it: {describe_differences(diffs, 'config.json', 'checkpoint')}. Use the checkpoint "
                        "with the run folder it came from")


def config_of(ckpt: Dict[str, Any], path: Path) -> Config:
    """The checkpoint's config, checked against this fastmaml's config keys and types. A key added
    after the checkpoint was written takes its ``absent`` value (what such runs did)."""
    from . import checkpoint as ckpt_mod

    saved = dict(ckpt["config"])
    name = saved.get("config")
    if name not in configs.CONFIGS:
        raise ckpt_mod.CheckpointError(f"checkpoint {path} names config {name!r}, unknown to this fastmaml")
    base = configs.get(name)
    for k in base:
        if k not in saved and k in configs.KEYS and configs.KEYS[k].absent is not None:
            saved[k] = configs.KEYS[k].absent
    missing = [k for k in base if k not in saved]
    extra = [k for k in saved if k not in base]
    if missing or extra:
        raise ckpt_mod.CheckpointError(f"checkpoint {path}: its config keys differ from {name}'s "
                                       f"(missing {missing}, unknown {extra})")
    for k, v in saved.items():
        if k != "config":
            configs.check_value(k, v, base[k], source=f"checkpoint {path}:")
    return saved


def restore_learner(ckpt: Dict[str, Any], path: Path, device: torch.device):
    """The trained learner of a checkpoint (validated before anything is loaded)."""
    from . import checkpoint as ckpt_mod

    config = config_of(ckpt, path)
    learner, _ = build_learner(config, device)
    ckpt_mod.check_compatible(ckpt, learner.model, learner.inner_lr, path)
    learner.model.load_state_dict(ckpt["model"])
    learner.inner_lr.load_state_dict(ckpt["inner_lr"])
    return config, learner


# -- evaluation ------------------------------------------------------------------------------------

def regression_errors(learner, sx, sy, qx, qy, max_steps: int) -> torch.Tensor:
    """[max_steps + 1, T]: each task's query MSE after 0..max_steps inner steps."""
    import torch

    rows = []
    with torch.no_grad():
        pred = learner.predict(learner.adapt(sx, sy, steps=0), qx)
        rows.append((pred - qy).pow(2).flatten(1).mean(1))
    for k in range(1, max_steps + 1):
        fast = learner.adapt(sx, sy, steps=k)
        pred = learner.predict(fast, qx)
        rows.append((pred - qy).pow(2).flatten(1).mean(1))
    return torch.stack(rows)


def evaluate(learner, config: Config, ds, episodes: int, steps: int, batch: int, seed: int,
             progress=None, queries_per_pass=None) -> Dict[str, Any]:
    """The evaluation summary dict (what eval.json holds, less the bookkeeping).
    ``queries_per_pass``: see :func:`~fastmaml.app.episodes.run_episodes` (None, or every query per
    class: one pass)."""
    import numpy as np
    import torch

    classification = config["dataset"] != "sinusoid"
    done = 0
    if classification:
        accs: List[float] = []
        losses: List[float] = []
        for sx, sy, qx, qy in fixed_episodes(ds, episodes, batch, seed):
            batch_losses, batch_accs = run_episodes(learner, [(sx, sy, qx, qy)], steps, True, config["ways"],
                                                    queries_per_pass)
            accs.extend(batch_accs)
            losses.extend(batch_losses)
            done += sx.shape[0]
            if progress is not None:
                progress.update(done, accuracy=float(np.mean(accs)))
        acc, acc_ci = mean_ci95(accs)
        loss, loss_ci = mean_ci95(losses)
        return {"accuracy": acc, "accuracy_ci95": acc_ci,
                "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                "loss": loss, "loss_ci95": loss_ci, "episodes": len(accs)}
    errors = []
    for sx, sy, qx, qy in fixed_episodes(ds, episodes, batch, seed):
        errors.append(regression_errors(learner, sx, sy, qx, qy, steps).double().cpu())
        done += sx.shape[0]
        if progress is not None:
            progress.update(done, loss=float(torch.cat(errors, 1)[-1].mean()))
    e = torch.cat(errors, 1).numpy()  # [steps + 1, n]
    by_step = []
    for k in range(steps + 1):
        m, ci = mean_ci95(e[k])
        by_step.append({"steps": k, "mse": m, "mse_ci95": ci})
    return {"mse": by_step[-1]["mse"], "mse_ci95": by_step[-1]["mse_ci95"], "mse_by_step": by_step,
            "episodes": int(e.shape[1])}


def _three_digits(x: float) -> str:
    """``x`` to 3 significant digits, trailing zeros kept (3.00, not 3: a number that looks whole
    reads as cut off)."""
    return format(x, "#.3g").rstrip(".")


def _steps(k: int) -> str:
    return f"{k} inner step" + ("" if k == 1 else "s")


def summary_line(result: Dict[str, Any]) -> str:
    """One sentence: e.g. ``sinusoid-tiny (iteration 1000, test split): MSE after 0 inner steps:
    3.07; after 1 inner step: 0.450; after 10 inner steps: 0.120 ± 0.0150 (95% CI over 600 tasks).``
    (No CI from a single episode or task.)"""
    head = f"{result['config']} (iteration {result['iteration']}, {result['split']} split)"
    n, s = result["episodes"], result["steps"]
    if "accuracy" in result:
        ci = result["accuracy_ci95"]
        spread = f" ± {100 * ci:.2f}% (95% CI over {n} episodes)" if ci is not None else f" ({n} episode)"
        q, k = result.get("queries"), result.get("queries_per_pass")
        passes = ""
        if k is not None and q is not None:
            passes = f"; queries in passes of {k} per class" if k < q else f"; all {q} queries per class in one pass"
        return f"{head}: accuracy after {_steps(s)}: {100 * result['accuracy']:.2f}%{spread}{passes}."
    by = result["mse_by_step"]
    ci = result["mse_ci95"]
    spread = f" ± {_three_digits(ci)} (95% CI over {n} tasks)" if ci is not None else f" ({n} task)"
    shown = [0, 1] if s > 1 else [0]  # the pre-update MSE and one step, then the last step with its CI
    parts = [f"after {_steps(k)}: {_three_digits(by[k]['mse'])}" for k in shown]
    parts.append(f"after {_steps(s)}: {_three_digits(result['mse'])}{spread}.")
    return f"{head}: MSE " + "; ".join(parts)


def resolve_queries_per_pass(requested, config: Config, queries: int) -> int:
    """The query images per class in each forward pass of ``fastmaml eval``, for an evaluation with
    ``queries`` per class: ``requested`` (a positive int that divides ``queries``, or ``"all"``), or by
    default (None) the config's ``queries``, the passes the run was meta-trained with, when it divides
    ``queries``, and else all of them in one pass (Reptile's configs, whose ``queries`` is an inner
    batch; the summary line and ``eval.json`` say which). Sinusoid: always all ``queries`` (its MLP has
    no BatchNorm; the points are independent)."""
    if config["dataset"] == "sinusoid":
        if requested not in (None, "all"):
            raise UserError("--queries-per-pass: only for classification runs (a sinusoid task's points are "
                            "independent: the MLP has no BatchNorm)")
        return queries
    if requested == "all":
        return queries
    if requested is None:
        return training_passes(config, queries)
    if queries % requested:
        raise UserError(f"--queries-per-pass {requested}: expected a divisor of --queries ({queries} per class) "
                        "or 'all'")
    return requested


def main(args) -> int:
    with sigterm_raises():  # SIGTERM ends eval with a message, as Ctrl-C does (eval.json is not written)
        return _main(args)


def _main(args) -> int:
    keep_freed_memory()
    device = resolve_device(args.device)
    set_threads(args.threads)
    ckpt, run_dir, ckpt_path = load_run(args.run)
    check_writable(run_dir, "eval.json", "make the run folder writable, or copy the run to a writable folder "
                   "and evaluate the copy")
    config, learner = restore_learner(ckpt, ckpt_path, device)
    episodes = args.episodes or config["eval_episodes"]
    steps = args.steps or config["test_steps"]
    batch = args.batch or config["eval_batch"]
    seed = {"test": config["eval_seed"], "val": config["val_seed"], "train": config["eval_seed"]}[args.split]
    queries = args.queries or config["eval_queries"]
    per_pass = resolve_queries_per_pass(args.queries_per_pass, config, queries)
    if args.task_rotations is not None and config["dataset"] != "omniglot":
        raise UserError(f"--task-rotations: only for Omniglot runs, this one is {config['dataset']}")
    task_rotations = args.task_rotations or "class"
    if config["dataset"] == "omniglot" and config["shots"] + queries > 20:
        raise UserError(f"--queries {queries}: Omniglot has 20 drawings per character, shots ({config['shots']}) "
                        "+ queries must be <= 20")
    data, remembered = args.data, None
    if data is None and config["dataset"] != "sinusoid":  # the data folder the run trained on, if it says
        data = remembered = run_info.data_folder(run_dir)
    try:
        ds = make_dataset(config, args.split, data, device, queries=queries, seed=seed, can_set=False,
                          task_rotations=task_rotations)
    except UserError as e:
        if remembered is None:
            raise
        raise run_info.with_data_origin(e, remembered, run_dir) from None
    bar = Progress(episodes, desc=f"eval {config['config']}", enabled=not args.quiet)
    t0 = time.perf_counter()
    try:
        learner.inner_lr.check_steps(steps)
    except ValueError as e:
        raise UserError(f"--steps {steps}: {e}") from None
    result = evaluate(learner, config, ds, episodes, steps, batch, seed, progress=bar,
                      queries_per_pass=per_pass)
    bar.close()
    out: Dict[str, Any] = {
        "config": config["config"], "iteration": ckpt["iteration"], "checkpoint": str(ckpt_path),
        "split": args.split, "steps": steps, "seed": seed, "queries": queries,
        "queries_per_pass": per_pass,
        "shots": config["shots"],
    }
    if config["dataset"] != "sinusoid":
        out["ways"] = config["ways"]
    if config["dataset"] == "omniglot":
        out["task_rotations"] = task_rotations
        out["data"] = run_info.user_data_folder(data, getattr(ds, "root", None), config["dataset"])
    out.update(result)
    out["ci"] = CI_NOTE
    out["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(run_dir / "eval.json", out)
    print(summary_line(out))
    return 0
