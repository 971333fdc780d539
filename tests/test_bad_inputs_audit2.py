"""Issue 21, item 4: the second bad-input audit's findings (the compat layers' are in test_compat_*).

1. a parameter frozen after the learner was built: followed exactly where the inner loop does not
   adapt it, refused (naming it) where it does; 7. a model changed after the learner was built and
   numeric arguments that are not numbers: errors naming the parameter / argument; 2. a damaged
   metrics.jsonl on resume: reported, the damaged file kept; 3. the run folder deleted during
   training: an error, nothing recreated; 4. eval / plot of a checkpoint of another config than the
   folder's config.json: refused; 5. divergence before any checkpoint: says there is none; 6. NaN in
   a config file, plot --tasks -3, --dist-timeout -5, a folder named checkpoint.pt, SIGTERM in eval.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import fsutil
from fastmaml.app import checkpoint as ckpt_mod
from fastmaml.app import configs as configs_mod
from fastmaml.algorithms import ANIL, IMAML, Reptile
from fastmaml.models import mlp_bn

from helpers import classification_batch, conv_bn, mlp, regression_batch, same_state, state
from test_cli import assert_user_error, run_cli, snapshot, subprocess_env, train_args

# -- 1. requires_grad changed after the learner was built ----------------------------------------------

def _grads(model: nn.Module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _same_grads(a, b) -> bool:
    return a.keys() == b.keys() and all(
        (a[n] is None and b[n] is None) or (a[n] is not None and b[n] is not None and torch.equal(a[n], b[n]))
        for n in a)


def _mamlpp(m):
    return fastmaml.MAML(m, inner_lr=[0.3, 0.2], inner_steps=2, learn_lr=True, lr_mode="per_layer_per_step",
                         multi_step_weights=[0.4, 1.0])


# learner kind -> (make the learner, a model, a batch, a parameter the inner loop does NOT adapt)
FOLLOWED = {
    "maml-fused": (lambda m: fastmaml.MAML(m, inner_lr=0.3, inner_steps=2), "conv", "1.weight"),
    "maml-loop": (lambda m: fastmaml.MAML(m, inner_lr=0.3, inner_steps=2, batching="loop"), "conv", "5.bias"),
    "maml-reference": (lambda m: fastmaml.MAML(m, inner_lr=0.3, inner_steps=2, backend="reference"), "conv",
                       "1.weight"),
    "mamlpp-per-step-bn": (_mamlpp, "mlp_bn", "2.weight"),
    "anil-body": (lambda m: ANIL(m, inner_lr=0.3, inner_steps=2), "conv", "0.weight"),
    "imaml": (lambda m: IMAML(m, inner_lr=0.1, inner_steps=2, lam=2.0), "conv", "1.bias"),
}


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        return conv_bn(ways=3, hidden=5, size=8).double()
    return mlp_bn(3, hidden=(9, 7), in_features=64, per_step_bn=2).double()


def _param(model: nn.Module, name: str) -> nn.Parameter:
    return dict(model.named_parameters())[name]


@pytest.mark.parametrize("kind", list(FOLLOWED))
def test_freezing_a_parameter_the_inner_loop_does_not_adapt_is_followed_exactly(kind):
    make, model_kind, name = FOLLOWED[kind]
    base = _model(model_kind)
    batch = classification_batch(3, ways=3, shots=2, queries=3, size=8, seed=4)
    later = copy.deepcopy(base)
    learner = make(later)
    assert name not in learner.layout.names
    learner.meta_step(*batch)  # one step with it trainable (caches built)
    later.zero_grad(set_to_none=True)
    _param(later, name).requires_grad_(False)
    learner.meta_step(*batch)
    first = copy.deepcopy(base)
    _param(first, name).requires_grad_(False)
    make(first).meta_step(*batch)  # the learner built after freezing
    assert _param(later, name).grad is None
    assert _same_grads(_grads(later), _grads(first))
    # made trainable again: as a learner built with it trainable
    later.zero_grad(set_to_none=True)
    _param(later, name).requires_grad_(True)
    learner.meta_step(*batch)
    again = copy.deepcopy(base)
    make(again).meta_step(*batch)
    assert _param(later, name).grad is not None
    assert _same_grads(_grads(later), _grads(again))
    # frozen, the optimizer does not move it
    later.zero_grad(set_to_none=True)
    _param(later, name).requires_grad_(False)
    learner.meta_step(*batch)
    before = _param(later, name).detach().clone()
    torch.optim.Adam(learner.parameters(), lr=0.1).step()
    assert torch.equal(_param(later, name), before)


# learner kind -> (make the learner, an adapted parameter)
REFUSED = {
    "maml": (lambda m: fastmaml.MAML(m, inner_lr=0.3), "0.weight"),
    "mamlpp": (_mamlpp, "4.weight"),
    "anil-head": (lambda m: ANIL(m, inner_lr=0.3), "9.bias"),
    "reptile": (lambda m: Reptile(m, inner_lr=0.1, inner_steps=2), "1.weight"),  # Reptile adapts BatchNorm too
    "imaml": (lambda m: IMAML(m, inner_lr=0.1, inner_steps=2), "4.weight"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_freezing_an_adapted_parameter_after_construction_is_refused(kind):
    make, name = REFUSED[kind]
    model = _model("conv")
    learner = make(model)
    batch = classification_batch(2, ways=3, shots=2, queries=2, size=8, seed=1)
    assert name in learner.layout.names
    learner.meta_step(*batch)
    _param(model, name).requires_grad_(False)
    before = state(learner)
    with pytest.raises(ValueError, match=rf"meta_step: model\.{name} is adapted by the inner loop but was frozen"):
        learner.meta_step(*batch)
    assert same_state(state(learner), before)
    with pytest.raises(ValueError, match=rf"adapt: model\.{name} is adapted"):
        learner.adapt(batch[0], batch[1])
    _param(model, name).requires_grad_(True)  # set back: accepted again
    learner.meta_step(*batch)


def test_unfreezing_a_parameter_that_a_new_learner_would_adapt_is_refused():
    model = mlp(1, 9, 1).double()
    model[2].weight.requires_grad_(False)
    learner = fastmaml.MAML(model, inner_lr=0.1)
    batch = regression_batch(3, seed=2)
    learner.meta_step(*batch)
    model[2].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.2\.weight was frozen when the learner was built and is trainable "
                                         r"now \(a learner built now would adapt it\)"):
        learner.meta_step(*batch)


# -- 7. layers changed after the learner was built, numeric arguments --------------------------------

def _replace_last(m):
    m[4] = nn.Linear(9, 3).double()


def _replace_same_shape(m):
    m[4] = nn.Linear(9, 1).double()


def _append(m):
    m.append(nn.Linear(1, 1).double())


def _reshape(m):
    m[2].weight.data = torch.randn(4, 9, dtype=torch.float64)


CHANGES = {
    "replaced-other-size": (_replace_last, r"model\.4\.weight is another tensor \(shape \[3, 9\]; the learner was "
                                           r"built with \[1, 9\]\)"),
    "replaced-same-size": (_replace_same_shape, r"model\.4\.weight is another tensor \(the same shape"),
    "appended": (_append, r"model\.5\.weight \(\[1, 1\]\) was added"),
    "reshaped": (_reshape, r"model\.2\.weight changed shape from \[9, 9\] to \[4, 9\]"),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("algo", ["maml", "anil", "reptile", "imaml"])
def test_a_model_changed_after_construction_is_refused_naming_the_parameter(change, algo):
    fn, pattern = CHANGES[change]
    model = mlp(1, 9, 1).double()
    learner = {"maml": fastmaml.MAML, "anil": ANIL, "reptile": Reptile, "imaml": IMAML}[algo](model, inner_lr=0.05)
    batch = regression_batch(3, seed=3)
    learner.meta_step(*batch)
    fast = learner.adapt(batch[0], batch[1])
    fn(model)
    for call, args in (("meta_step", batch), ("adapt", batch[:2])):
        with pytest.raises(ValueError, match=rf"{call}: the model changed after the learner was built: .*{pattern}"):
            getattr(learner, call)(*args)
    if algo == "maml":
        with pytest.raises(ValueError, match=rf"predict: the model changed .*{pattern}"):
            learner.predict(fast, batch[2])
        with pytest.raises(ValueError, match=rf"evaluate: the model changed .*{pattern}"):
            learner.evaluate(*batch)


BAD_NUMBERS = [
    (lambda: Reptile(mlp().double(), outer_lr="abc"), TypeError, r"outer_lr .*must be a number, got 'abc'"),
    (lambda: Reptile(mlp().double(), variant="serial", outer_lr="abc"), TypeError, r"outer_lr .*must be a number"),
    (lambda: Reptile(mlp().double(), outer_lr=float("nan")), ValueError, r"outer_lr .*must be finite"),
    (lambda: Reptile(mlp().double(), outer_lr=[0.1]), TypeError, r"outer_lr .*must be a number, got \[0\.1\]"),
    (lambda: Reptile(mlp().double(), variant="serial", outer_lr=1.5), ValueError, r"outer_lr .*must be in \(0, 1\]"),
    (lambda: Reptile(mlp().double(), variant="serial", outer_lr=0.5).set_outer_lr("x"), TypeError,
     r"outer_lr \(eps\) must be a number"),
    (lambda: fastmaml.MAML(mlp().double(), multi_step_weights=["a"]), TypeError,
     r"multi_step_weights\[0\] must be a number, got 'a'"),
    (lambda: fastmaml.MAML(mlp().double(), inner_steps=2, multi_step_weights=[1.0, float("nan")]), ValueError,
     r"multi_step_weights\[1\] must be finite"),
    (lambda: fastmaml.MAML(mlp().double(), inner_steps=2, multi_step_weights=[0.5, -1.0]), ValueError,
     r"multi_step_weights\[1\] must be in \[0, inf\)"),
    (lambda: fastmaml.MAML(mlp().double(), multi_step_weights=1.0), TypeError, r"multi_step_weights must be a sequence"),
    (lambda: IMAML(mlp().double(), cg_tol=float("inf")), ValueError, r"cg_tol must be a finite number"),
]


@pytest.mark.parametrize("i", range(len(BAD_NUMBERS)))
def test_numeric_arguments_that_are_not_numbers_are_named(i):
    make, exc, pattern = BAD_NUMBERS[i]
    with pytest.raises(exc, match=pattern):
        make()


def test_numeric_arguments_still_accept_numpy_and_tensors():
    import numpy as np

    a = fastmaml.MAML(mlp().double(), inner_steps=2, multi_step_weights=np.array([0.25, 1.0]))
    b = fastmaml.MAML(mlp().double(), inner_steps=2, multi_step_weights=torch.tensor([0.25, 1.0]))
    assert a.multi_step_weights == b.multi_step_weights == [0.25, 1.0]
    assert Reptile(mlp().double(), variant="serial", outer_lr=np.float32(0.5)).outer_lr == 0.5


# -- the command line: a small trained run -------------------------------------------------------------

SETS = ("checkpoint_every=2", "val_every=0", "log_every=2")


@pytest.fixture(scope="module")
def trained6(tmp_path_factory):
    """sinusoid-tiny trained to iteration 6 (checkpoints at 4 and 6, metric lines at 2, 4, 6)."""
    run = tmp_path_factory.mktemp("audit2") / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=6", *SETS)) == 0
    return run


@pytest.fixture
def run6(trained6, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained6, run)
    return run


def _warnings(err: str):
    return [line for line in err.splitlines() if line.startswith("fastmaml: warning:")]


# -- 2. a damaged metrics.jsonl on resume ---------------------------------------------------------------

def _cut(b):
    return b[:-20]


def _half(b):
    return b[:len(b) // 2]


def _nul(b):
    return b[:30] + b"\0" * 40 + b[70:]


DAMAGE = {  # name -> (damage, what the warning says, the iterations kept)
    "last-line-cut": (_cut, "line 3 is cut off (no end of line)", [2, 4]),
    "truncated": (_half, "it is shorter", [2]),
    "emptied": (lambda b: b"", "it is empty", []),
    "nul-bytes": (_nul, "line 1 holds NUL bytes", [4, 6]),
    "edited": (lambda b: b.replace(b'"iter": 4', b'"iter": 5'), "differ from what training wrote", [2, 5, 6]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_metrics_file_is_reported_and_kept_on_resume(run6, damage, capsys):
    fn, says, kept = DAMAGE[damage]
    path = run6 / "metrics.jsonl"
    damaged = fn(path.read_bytes())
    path.write_bytes(damaged)
    capsys.readouterr()
    assert run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume") == 0
    warn = _warnings(capsys.readouterr().err)
    assert len(warn) == 1, warn
    assert f"{path} is damaged" in warn[0] and says in warn[0], warn[0]
    assert "the checkpoint of iteration 6 was written after 3 lines" in warn[0]
    lost = 3 - len(kept) if damage != "edited" else 0
    assert f"Kept: {len(kept)} line" in warn[0] and f"lost: {lost} of those 3 lines" in warn[0], warn[0]
    copies = sorted(run6.glob("metrics.jsonl.damaged-*"))
    if damaged:
        assert len(copies) == 1 and copies[0].read_bytes() == damaged and str(copies[0]) in warn[0]
    else:
        assert copies == []
    iters = [json.loads(line)["iter"] for line in path.read_text().splitlines()]
    assert iters == kept + [8]


def test_a_deleted_metrics_file_is_reported_on_resume(run6, capsys):
    (run6 / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume") == 0
    warn = _warnings(capsys.readouterr().err)
    assert len(warn) == 1 and "metrics.jsonl is missing" in warn[0] and "3 lines" in warn[0], warn
    assert [json.loads(line)["iter"] for line in (run6 / "metrics.jsonl").read_text().splitlines()] == [8]


def test_an_intact_metrics_file_resumes_without_a_warning(run6, capsys):
    with open(run6 / "metrics.jsonl", "a") as f:  # lines past the checkpoint, the last torn by a kill
        f.write(json.dumps({"split": "train", "iter": 7, "loss": 1.0}) + "\n" + '{"split": "tr')
    capsys.readouterr()
    assert run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume") == 0
    assert _warnings(capsys.readouterr().err) == []
    assert list(run6.glob("metrics.jsonl.damaged-*")) == []


def test_a_checkpoint_without_the_metrics_record_still_reports_unreadable_lines(run6, capsys):
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # as written by an older fastmaml
        ck = torch.load(run6 / name, weights_only=True)
        ck["progress"].pop("metrics", None)
        ckpt_mod.save(run6 / name, ck)
    path = run6 / "metrics.jsonl"
    path.write_bytes(_nul(path.read_bytes()))
    capsys.readouterr()
    assert run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume") == 0
    warn = _warnings(capsys.readouterr().err)
    assert len(warn) == 1 and "line 1 holds NUL bytes" in warn[0] and "kept: 2 lines (iterations 4-6)" in warn[0]


# -- 3. the run folder deleted during training -----------------------------------------------------------

def _delete_at(monkeypatch, call: int, what):
    """Make the 'call'-th meta-step of this process delete what(run) first."""
    real = fastmaml.MAML.meta_step
    count = [0]

    def meta_step(self, *a, **kw):
        count[0] += 1
        if count[0] == call:
            what()
        return real(self, *a, **kw)

    monkeypatch.setattr(fastmaml.MAML, "meta_step", meta_step)


def test_deleting_the_run_folder_during_training_stops_it_without_recreating_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _delete_at(monkeypatch, 3, lambda: shutil.rmtree(run))
    rc = run_cli(*train_args("sinusoid-tiny", run, "iterations=20", *SETS))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"fastmaml: error: the run folder {run} was deleted or moved during training, at "
                               "iteration 4"), lines[0]
    assert "nothing of this run is left to resume" in lines[0]
    assert not run.exists()


def test_deleting_metrics_jsonl_during_training_stops_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _delete_at(monkeypatch, 5, lambda: (run / "metrics.jsonl").unlink())
    rc = run_cli(*train_args("sinusoid-tiny", run, "iterations=20", *SETS))
    err = capsys.readouterr().err
    assert rc == 1 and f"fastmaml: error: {run / 'metrics.jsonl'} was deleted during training, at iteration 6" in err
    assert "its last checkpoint (iteration 4) is still there: continue with" in err
    assert ckpt_mod.load(run / "checkpoint.pt")["iteration"] == 4  # nothing written after the deletion
    assert not (run / "metrics.jsonl").exists()


def test_a_checkpoint_does_not_recreate_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ckpt_mod.save(tmp_path / "gone" / "checkpoint.pt", {"x": 1})
    assert e.value.filename == str(tmp_path / "gone" / "checkpoint.pt")
    assert not (tmp_path / "gone").exists()


# -- 4. eval and plot refuse a checkpoint of another config than the folder's -----------------------------

def test_eval_and_plot_refuse_a_checkpoint_of_another_config(run6, tmp_path, capsys):
    other = tmp_path / "other"
    assert run_cli(*train_args("sinusoid-tiny", other, "iterations=2", "hidden=8,8", *SETS)) == 0
    shutil.copy(other / "checkpoint.pt", run6 / "checkpoint.pt")
    hidden = ",".join(str(h) for h in json.loads((run6 / "config.json").read_text())["hidden"])
    assert hidden != "8,8"
    before = snapshot(run6)
    capsys.readouterr()
    for argv in (("eval", run6, "--quiet"), ("eval", run6 / "checkpoint.pt", "--quiet"), ("plot", run6)):
        line = assert_user_error(capsys, run_cli(*argv), f"{run6 / 'checkpoint.pt'} is a checkpoint of a different "
                                 "config than its run folder's config.json; refusing to use it",
                                 f"hidden: {hidden} (config.json) vs 8,8 (checkpoint)")
        assert "Traceback" not in line
    assert snapshot(run6) == before
    # resume refuses it the same way
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume"),
                      "holds a run of a different config", f"hidden: 8,8 (checkpoint) vs {hidden} (requested)")


def test_eval_accepts_a_checkpoint_whose_run_was_extended(run6, capsys):
    config = json.loads((run6 / "config.json").read_text())
    config["iterations"] = 50  # a resume may change iterations: not a different run
    (run6 / "config.json").write_text(json.dumps(config))
    assert run_cli("eval", run6, "--quiet", "--episodes", "2") == 0


# -- 5. divergence before the first checkpoint ------------------------------------------------------------

def _diverge_at(monkeypatch, call: int):
    real = fastmaml.MAML.meta_step
    count = [0]

    def meta_step(self, *a, **kw):
        count[0] += 1
        if count[0] == call:
            raise FloatingPointError("non-finite support (inner) loss nan at inner step 0 of task 0")
        return real(self, *a, **kw)

    monkeypatch.setattr(fastmaml.MAML, "meta_step", meta_step)


def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _diverge_at(monkeypatch, 1)
    rc = run_cli(*train_args("sinusoid-tiny", run, "iterations=20", *SETS))
    err = capsys.readouterr().err
    assert rc == 1 and "training diverged at iteration 1" in err, err
    assert "no checkpoint was written yet (the first is due at iteration 2)" in err, err
    assert "intact" not in err and not (run / "checkpoint.pt").exists()


def test_divergence_after_a_checkpoint_names_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _diverge_at(monkeypatch, 5)
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=20", *SETS)) == 1
    assert f"the last checkpoint ({run / 'checkpoint.pt'}, iteration 4) is intact" in capsys.readouterr().err


# -- 6. assorted -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["inner_lr", "meta_lr"])
@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_non_finite_float_in_a_config_file_is_one_line(tmp_path, capsys, key, value):
    config = dict(configs_mod.get("sinusoid-tiny"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config).replace(f'"{key}": {json.dumps(config[key])}', f'"{key}": {value}'))
    assert value in path.read_text()
    out = tmp_path / "run"
    assert_user_error(capsys, run_cli(*train_args(str(path), out)), f"config file {path}: {key}=",
                      "expected a finite float")
    assert not out.exists()


@pytest.mark.parametrize("tasks", ["-3", "0", "two"])
def test_plot_tasks_must_be_positive(run6, capsys, tasks):
    before = snapshot(run6)
    assert_user_error(capsys, run_cli("plot", run6, "--tasks", tasks), "argument --tasks: expected a positive int")
    assert snapshot(run6) == before


def test_plot_run_refuses_a_non_positive_task_count(run6):
    from fastmaml.app.plots import plot_run

    with pytest.raises(configs_mod.UserError, match="--tasks -3: expected a positive int"):
        plot_run(run6, tasks=-3)


@pytest.mark.parametrize("extra", [[], ["--nproc", "2"]])
@pytest.mark.parametrize("timeout", ["-5", "0", "nan"])
def test_dist_timeout_must_be_positive_with_or_without_nproc(tmp_path, capsys, extra, timeout):
    out = tmp_path / "run"
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", out), "--dist-timeout", timeout, *extra),
                      f"argument --dist-timeout: expected a positive number of seconds", repr(timeout))
    assert not out.exists()


def test_a_folder_named_checkpoint_pt_is_named_as_such(run6, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    (fresh / "checkpoint.pt").mkdir(parents=True)
    line = assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", fresh, *SETS)),
                             f"{fresh / 'checkpoint.pt'} is not a file (a folder?)")
    assert ".tmp" not in line
    (run6 / "checkpoint.pt").unlink()
    (run6 / "checkpoint.pt").mkdir()
    before = snapshot(run6)
    line = assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run6, "iterations=8", *SETS), "--resume"),
                             f"{run6 / 'checkpoint.pt'} is not a file (a folder?)")
    assert ".tmp" not in line and snapshot(run6) == before


def test_an_atomic_write_onto_a_folder_names_the_folder(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(OSError) as e:
        with fsutil.atomic_write(tmp_path / "checkpoint.pt", suffix=".tmp") as f:
            f.write(b"x")
    assert e.value.filename == str(tmp_path / "checkpoint.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # the temporary file is gone


SIGTERM_IN_EVAL = """
import os, signal, sys
from fastmaml.app import cli, evaluate
def evaluate_then_sigterm(*a, **kw):
    os.kill(os.getpid(), signal.SIGTERM)  # as if sent while the episodes run
    raise AssertionError("SIGTERM did not stop eval")
evaluate.evaluate = evaluate_then_sigterm
sys.exit(cli.main(["eval", sys.argv[1], "--quiet", "--episodes", "4"]))
"""


def test_sigterm_during_eval_prints_a_message(run6):
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_EVAL, str(run6)], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == "fastmaml: terminated (SIGTERM)", r.stderr
    assert "Traceback" not in r.stderr and not (run6 / "eval.json").exists()
