"""``fastmaml plot``: PNG figures of a run (matplotlib, Agg backend), in ``RUN_DIR/plots/``.

* ``learning_curves.png``: training loss (and accuracy) per logged iteration, with the validation
  points and their 95% confidence intervals;
* sinusoid runs with a checkpoint: ``sinusoid.png``, the paper's Figure 2: for held-out tasks, the
  true function, the K support points, and the prediction of the meta-learned model before adaptation
  and after 1 and 10 inner steps;
* with an ``eval.json`` of a sinusoid run: ``mse_by_step.png``, the test MSE after 0..N steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserError
from .evaluate import _positive_int  # one parser for a positive count, shared with `eval`
from .evaluate import load_run, restore_learner
from .run_setup import resolve_device
from .run_folder import check_writable, read_json, read_metrics
from .termination import sigterm_raises

COMMAND_HELP = "plot a run's learning curves (and, for sinusoid, the paper's Figure 2) as PNGs"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (holding metrics.jsonl)")
    p.add_argument("--tasks", type=_positive_int, default=3,
                   help="sinusoid: how many held-out tasks to draw (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def learning_curves(metrics: List[Dict[str, Any]], title: str, path: Path) -> Path:
    plt = _pyplot()
    train = [m for m in metrics if m.get("split") == "train"]
    val = [m for m in metrics if m.get("split") == "val"]
    has_acc = any("accuracy" in m for m in train + val)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    ax = axes[0][0]
    # a curve of few points gets markers: a run with one training line still shows it
    dots = dict(marker="o", ms=3) if len(train) <= 50 else {}
    if train:
        ax.plot([m["iter"] for m in train], [m["loss"] for m in train], label="training (query loss)", lw=1, **dots)
    if val:
        _errorbars(ax, val, "loss", "loss_ci95", "validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" if has_acc else "MSE")
    if not has_acc and all(m["loss"] > 0 for m in train + val):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        tr = [m for m in train if "accuracy" in m]
        if tr:
            ax.plot([m["iter"] for m in tr], [100 * m["accuracy"] for m in tr], label="training", lw=1, **dots)
        va = [m for m in val if "accuracy" in m]
        if va:
            _errorbars(ax, va, "accuracy", "accuracy_ci95", "validation", scale=100)
        ax.set_xlabel("iteration")
        ax.set_ylabel("query accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
    return path


def _errorbars(ax, rows, key, ci_key, label, scale=1.0):
    x = [m["iter"] for m in rows]
    y = [scale * m[key] for m in rows]
    err = [scale * (m.get(ci_key) or 0.0) for m in rows]
    steps = rows[-1].get("steps")
    ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, lw=1,
                label=f"{label} ({steps} steps, 95% CI)" if steps else label)


def sinusoid_figure(run_dir: Path, path: Path, tasks: int, device: str, loaded=None) -> Optional[Path]:
    """The paper's Figure 2 for ``tasks`` held-out tasks (needs the run's checkpoint; ``loaded``:
    what ``evaluate.load_run`` returned, if it was called already)."""
    import torch

    from .. import data

    ckpt, _, ckpt_path = loaded if loaded is not None else load_run(str(run_dir))
    config, learner = restore_learner(ckpt, ckpt_path, resolve_device(device))
    dev = next(learner.model.parameters()).device
    ds = data.Sinusoid(shots=config["shots"], queries=1, device=dev, seed=config["eval_seed"] + 1000)
    sx, sy, _, _, params = _sample_with_params(ds, tasks)
    amp, phase = (p.to(dev).reshape(-1) for p in params)
    grid = torch.linspace(-5.0, 5.0, 400, device=dev).view(1, -1, 1).expand(tasks, -1, -1).contiguous()
    truth = _true_function(grid, amp, phase)
    steps = [0, 1, 10]
    preds = {k: learner.predict(learner.adapt(sx, sy, steps=k), grid) for k in steps}
    plt = _pyplot()
    fig, axes = plt.subplots(1, tasks, figsize=(4.2 * tasks, 3.4), squeeze=False)
    g = grid[0, :, 0].cpu().numpy()
    styles = {0: dict(ls=":", color="tab:green", label="pre-update"),
              1: dict(ls="--", color="tab:blue", label="1 grad step"),
              10: dict(ls="--", color="tab:purple", label="10 grad steps")}
    for t in range(tasks):
        ax = axes[0][t]
        ax.plot(g, truth[t, :, 0].cpu().numpy(), color="tab:red", lw=2, label="ground truth")
        for k in steps:
            ax.plot(g, preds[k][t, :, 0].cpu().numpy(), **styles[k])
        ax.scatter(sx[t, :, 0].cpu().numpy(), sy[t, :, 0].cpu().numpy(), marker="^", color="black", zorder=5,
                   label=f"{config['shots']} points used for grad")
        ax.set_xlim(-5, 5)
        ax.grid(alpha=0.3)
        if t == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"MAML, K={config['shots']} ({config['config']}, iteration {ckpt['iteration']})")
    _save(fig, path)
    plt.close(fig)
    return path


def _sample_with_params(ds, n):
    """(sx, sy, qx, qy, (amplitude, phase)) whether the sampler returns the two extra tensors flat
    or as a pair."""
    out = tuple(ds.sample(n, return_params=True))
    if len(out) == 6:
        return (*out[:4], (out[4], out[5]))
    return (*out[:4], tuple(out[4]))


def _true_function(x, amp, phase):
    """``A sin(x - phase)``: the sinusoid tasks of the paper and of ``fastmaml.data.Sinusoid``."""
    import torch

    return amp.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def mse_by_step(result: Dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    rows = result["mse_by_step"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar([r["steps"] for r in rows], [r["mse"] for r in rows], yerr=[r["mse_ci95"] or 0 for r in rows],
                marker="o", capsize=3, label="MAML")
    ax.set_xlabel("inner gradient steps")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"{result['config']}: {result['episodes']} held-out tasks, 95% CI")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, tasks: int = 3, device: str = "cpu") -> List[Path]:
    from .checkpoint import FILENAME, PREV_FILENAME

    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise UserError(f"--tasks {tasks}: expected a positive int (the held-out sinusoid tasks to draw)")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    metrics_path = run_dir / "metrics.jsonl"
    config = read_json(run_dir / "config.json") or {}
    if not metrics_path.exists():
        raise UserError(f"{run_dir} holds no metrics (metrics.jsonl); train it first with fastmaml train")
    metrics = read_metrics(metrics_path)
    if not metrics:
        every = config.get("log_every")
        when = f" (log_every={every})" if every else ""
        raise UserError(f"{metrics_path} has no metric lines yet: the run stopped before its first log line{when}; "
                        "resume it (fastmaml train ... --resume) to go on")
    out_dir = run_dir / "plots"
    check_writable(out_dir, "the plots", "make the run folder writable, or copy the run to a writable folder")
    loaded = None
    if config.get("dataset") == "sinusoid" and ((run_dir / FILENAME).exists() or (run_dir / PREV_FILENAME).exists()):
        loaded = load_run(str(run_dir))  # validated before anything is drawn
    out_dir.mkdir(exist_ok=True)
    name = config.get("config", run_dir.name)
    made = [learning_curves(metrics, name, out_dir / "learning_curves.png")]
    if config.get("dataset") == "sinusoid":
        if loaded is not None:
            made.append(sinusoid_figure(run_dir, out_dir / "sinusoid.png", tasks, device, loaded))
        result = read_json(run_dir / "eval.json")
        if result and "mse_by_step" in result:
            made.append(mse_by_step(result, out_dir / "mse_by_step.png"))
    return made


def main(args) -> int:
    with sigterm_raises():  # SIGTERM ends plot with a message, as Ctrl-C does
        for p in plot_run(Path(args.run), args.tasks, args.device):
            print(p)
    return 0
