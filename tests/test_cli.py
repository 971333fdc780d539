"""The `fastmaml` command end to end on tiny configs: train, eval, plot, configs, and every bad input
(exit status 2, one `fastmaml: error:` line, no traceback, the run folder untouched)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmaml import models
from fastmaml.app import cli
from fastmaml.app import configs as configs_mod

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*argv):
    """``fastmaml ARGV`` in this process: the exit status (argparse's SystemExit included)."""
    threads = torch.get_num_threads()
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    finally:
        torch.set_num_threads(threads)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def snapshot(folder: Path):
    """Every file under ``folder``: its bytes' hash and mtime (to show that nothing changed)."""
    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def train_args(config, out, *sets):
    return ["train", config, "--out", out, "--threads", "1", "--quiet", *(["--set", *sets] if sets else [])]


def metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_user_error(capsys, rc, *fragments):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fastmaml: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A sinusoid-tiny run trained to iteration 20 (checkpoints at 10 and 20)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    rc = run_cli(*train_args("sinusoid-tiny", run, "iterations=20", "checkpoint_every=10", "val_every=10",
                             "log_every=5", "val_episodes=4", "test_steps=3"))
    assert rc == 0
    return run


# -- commands ---------------------------------------------------------------------------------------

def test_configs_command(capsys):
    assert run_cli("configs") == 0
    out = capsys.readouterr().out
    for name in configs_mod.names():
        assert f"\n{name}: " in "\n" + out
    assert "inner_lr=0.4" in out and "meta_batch=32" in out
    assert run_cli("configs", "omniglot-20w1s") == 0
    out = capsys.readouterr().out
    assert "inner_lr" in out and "0.1" in out and "float" in out and "meta_batch" in out
    assert_user_error(capsys, run_cli("configs", "nope"), "unknown config", "omniglot-5w1s")


def test_python_m_fastmaml_help_and_error_exit_status():
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "fastmaml", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0
    for command in ("train", "eval", "plot", "configs"):
        assert command in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmaml", "train", "nope"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("fastmaml: error: unknown config 'nope'") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_commands_table_is_extensible(capsys):
    assert set(cli.COMMANDS) >= {"train", "eval", "plot", "configs"}
    for command in cli.COMMANDS:
        assert run_cli(command, "--help") == 0
        assert f"usage: fastmaml {command}" in capsys.readouterr().out
    assert all(isinstance(m, str) and m.startswith("fastmaml.") for m in cli.COMMANDS.values())


def test_sinusoid_train_eval_plot(trained, capsys):
    run = trained
    config = json.loads((run / "config.json").read_text())
    assert config["config"] == "sinusoid-tiny" and config["iterations"] == 20
    lines = metrics(run)
    assert [(m["split"], m["iter"]) for m in lines] == [
        ("train", 5), ("train", 10), ("val", 10), ("train", 15), ("train", 20), ("val", 20)]
    assert all(m["loss"] > 0 and "tasks_per_s" in m for m in lines if m["split"] == "train")
    assert all(m["episodes"] == 4 and m["steps"] == 3 and m["loss_ci95"] is not None for m in lines if m["split"] == "val")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 20 and ckpt["config"] == config
    assert set(ckpt["model"]) == set(models.build(config).state_dict())
    assert {"torch", "numpy", "python", "sampler"} <= set(ckpt["rng"]) and "optimizer" in ckpt

    capsys.readouterr()
    assert run_cli("eval", run, "--episodes", "30", "--quiet") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("sinusoid-tiny (iteration 20, test split): MSE after 0 inner steps: ")
    assert "; after 1 inner step: " in out[0] and "; after 3 inner steps: " in out[0]
    assert out[0].endswith(" (95% CI over 30 tasks).")
    result = json.loads((run / "eval.json").read_text())
    assert result["episodes"] == 30 and result["steps"] == 3 and result["iteration"] == 20
    assert [r["steps"] for r in result["mse_by_step"]] == [0, 1, 2, 3]
    assert result["mse"] == result["mse_by_step"][-1]["mse"] and result["mse_ci95"] > 0
    assert "ddof=1" in result["ci"]
    # the same fixed episodes: evaluating a checkpoint file gives the same numbers
    assert run_cli("eval", run / "checkpoint.pt", "--episodes", "30", "--quiet") == 0
    assert json.loads((run / "eval.json").read_text())["mse_by_step"] == result["mse_by_step"]

    assert run_cli("plot", run) == 0
    for name in ("learning_curves.png", "sinusoid.png", "mse_by_step.png"):
        data = (run / "plots" / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name


def test_omniglot_tiny_end_to_end(tmp_path, capsys):
    if not os.environ.get("FASTMAML_DATA"):
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    run = tmp_path / "omni"
    assert run_cli(*train_args("omniglot-tiny", run, "iterations=4", "val_every=2", "checkpoint_every=2",
                               "log_every=2", "val_episodes=2")) == 0
    lines = metrics(run)
    assert [(m["split"], m["iter"]) for m in lines] == [("train", 2), ("val", 2), ("train", 4), ("val", 4)]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in lines)
    capsys.readouterr()
    assert run_cli("eval", run, "--episodes", "4", "--steps", "2", "--quiet") == 0
    out = capsys.readouterr().out
    assert "accuracy after 2 inner steps: " in out and "% (95% CI over 4 episodes); " in out
    result = json.loads((run / "eval.json").read_text())
    assert result["ways"] == 5 and result["queries"] == 5 and 0 <= result["accuracy"] <= 1
    assert result["queries_per_pass"] == 5 and "; all 5 queries per class in one pass." in out  # 3 divides not 5
    # the default passes are the training's (queries=3 per class): the same numbers as asking for them,
    # other numbers than one pass (BatchNorm's batch statistics)
    six = {}
    for name, extra in (("default", ()), ("3", ("--queries-per-pass", "3")), ("all", ("--queries-per-pass", "all"))):
        assert run_cli("eval", run, "--episodes", "4", "--steps", "2", "--queries", "6", "--quiet", *extra) == 0
        six[name] = json.loads((run / "eval.json").read_text())
    assert "; queries in passes of 3 per class." in capsys.readouterr().out.splitlines()[0]
    assert six["default"]["queries_per_pass"] == 3 and six["all"]["queries_per_pass"] == 6
    assert (six["default"]["accuracy"], six["default"]["loss"]) == (six["3"]["accuracy"], six["3"]["loss"])
    assert six["default"]["loss"] != six["all"]["loss"]
    assert run_cli("plot", run) == 0
    assert (run / "plots" / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_omniglot_validation_sends_queries_in_the_training_passes(tmp_path, capsys):
    """Validation during training sends the queries through the network ``queries`` per class at a time,
    as ``fastmaml eval`` does by default: its accuracy and loss equal those of ``fastmaml eval --split
    val`` on the same checkpoint and episodes, and differ from one pass (BatchNorm's batch statistics).
    A validation that sent all queries in one pass fails this."""
    if not os.environ.get("FASTMAML_DATA"):
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    run = tmp_path / "omni"
    assert run_cli(*train_args("omniglot-tiny", run, "iterations=2", "val_every=2", "checkpoint_every=2",
                               "log_every=2", "val_episodes=6", "eval_queries=6", "eval_batch=4")) == 0
    val = [m for m in metrics(run) if m["split"] == "val"][-1]
    assert (val["iter"], val["episodes"], val["steps"]) == (2, 6, 3)
    evals = {}
    for name, extra in (("default", ()), ("all", ("--queries-per-pass", "all"))):
        assert run_cli("eval", run, "--split", "val", "--episodes", "6", "--batch", "4", "--threads", "1", "--quiet",
                       *extra) == 0
        evals[name] = json.loads((run / "eval.json").read_text())
    assert evals["default"]["queries_per_pass"] == 3 and evals["default"]["queries"] == 6
    assert (val["accuracy"], val["loss"]) == (evals["default"]["accuracy"], evals["default"]["loss"])
    assert val["loss"] != evals["all"]["loss"]


def test_default_run_folder_is_runs_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", "sinusoid-tiny", "--set", "iterations=2", "val_every=0", "--threads", "1", "--quiet") == 0
    assert (tmp_path / "runs" / "sinusoid-tiny" / "checkpoint.pt").is_file()


def test_resume_extends_and_drops_metric_lines_past_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    base = ["checkpoint_every=10", "log_every=5", "val_every=0"]
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=20", *base)) == 0
    with open(run / "metrics.jsonl", "a") as f:  # lines a killed run wrote after its last checkpoint
        f.write(json.dumps({"split": "train", "iter": 25, "loss": -1.0}) + "\n")
        f.write('{"split": "train", "iter": 3')  # torn by the kill
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=30", *base), "--resume") == 0
    lines = metrics(run)
    assert [m["iter"] for m in lines] == [5, 10, 15, 20, 25, 30]
    assert all(m["loss"] > 0 for m in lines)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 30
    assert json.loads((run / "config.json").read_text())["iterations"] == 30
    # resuming a finished run does nothing
    before = snapshot(run)
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=30", *base), "--resume") == 0
    assert snapshot(run) == before
    # --force starts over
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=10", *base), "--force") == 0
    assert [m["iter"] for m in metrics(run)] == [5, 10]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 10


# -- bad input: its error, and nothing changed ----------------------------------------------------------

def test_unknown_config(trained, capsys):
    before = snapshot(trained)
    line = assert_user_error(capsys, run_cli(*train_args("omniglot-5w2s", trained), "--resume"),
                             "unknown config 'omniglot-5w2s'", "omniglot-5w1s", "sinusoid-tiny")
    assert "valid configs" in line
    assert snapshot(trained) == before


def test_unknown_set_key(trained, capsys):
    before = snapshot(trained)
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", trained, "inner_lrr=0.1"), "--resume"),
                      "unknown key 'inner_lrr'", "valid keys:", "inner_lr", "iterations", "seed")
    assert snapshot(trained) == before


@pytest.mark.parametrize("assignment, expected", [
    ("meta_batch=4.5", "expected an int"),
    ("meta_lr=abc", "expected a float"),
    ("first_order=2", "expected a bool"),
    ("hidden=40;40", "expected a comma-separated list of ints"),
])
def test_wrong_type(trained, capsys, assignment, expected):
    before = snapshot(trained)
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", trained, assignment), "--resume"), expected)
    assert snapshot(trained) == before


def test_resume_with_a_different_config_shows_the_differences(trained, capsys):
    before = snapshot(trained)
    line = assert_user_error(
        capsys, run_cli(*train_args("sinusoid-tiny", trained, "inner_lr=0.02", "meta_batch=8", "iterations=40"),
                        "--resume"),
        "different config", "inner_lr: 0.01 (checkpoint) vs 0.02 (requested)",
        "meta_batch: 25 (checkpoint) vs 8 (requested)")
    assert "iterations" not in line  # may change on resume
    assert snapshot(trained) == before


def test_folder_holding_another_run_is_refused(trained, capsys):
    before = snapshot(trained)
    assert_user_error(capsys, run_cli(*train_args("omniglot-tiny", trained)),
                      "already holds a different run", "config: sinusoid-tiny (there) vs omniglot-tiny (requested)",
                      "--force")
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", trained, "iterations=20", "checkpoint_every=10",
                                                  "val_every=10", "log_every=5", "val_episodes=4",
                                                  "test_steps=3")),
                      "already holds a run of this config", "--resume", "--force")
    assert snapshot(trained) == before


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    run = tmp_path / "new-run"
    line = assert_user_error(capsys, run_cli(*train_args("omniglot-tiny", run), "--data", tmp_path / "nowhere"),
                             "omniglot data not found", "--data DIR", "--set download=true")
    assert not run.exists()
    assert str(tmp_path / "nowhere") in line and str(tmp_path / "nowhere" / "omniglot") in line  # whole paths
    # issue 13 item 18: short, in the command line's own spelling, said once
    rest = line.replace(str(tmp_path / "nowhere" / "omniglot"), "").replace(str(tmp_path / "nowhere"), "")
    assert len(rest) < 250, line
    assert "root" not in rest and "download=True" not in rest and "..." not in line
    assert line.count("not found") == 1


def test_bad_eval_and_plot_targets(tmp_path, capsys):
    assert_user_error(capsys, run_cli("eval", tmp_path / "none"), "no such run folder or checkpoint")
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, run_cli("eval", tmp_path / "empty"), "holds no checkpoint")
    assert_user_error(capsys, run_cli("plot", tmp_path / "empty"), "holds no metrics")
    assert snapshot(tmp_path / "empty") == {}
    assert_user_error(capsys, run_cli("eval", tmp_path / "empty", "--episodes", "0"), "--episodes")
    assert_user_error(capsys, run_cli("train", "sinusoid-tiny", "--resume", "--force"), "not allowed with")
    assert_user_error(capsys, run_cli("bogus"), "invalid choice")


def test_figure2_ground_truth_is_the_data_layers_function():
    from fastmaml.data import Sinusoid
    from fastmaml.app.plots import _true_function

    sx, sy, qx, qy, amp, phase = Sinusoid(shots=5, queries=3, seed=4).sample(6, return_params=True)
    assert torch.allclose(_true_function(sx, amp, phase), sy, atol=1e-6)
    assert torch.allclose(_true_function(qx, amp, phase), qy, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_graph_needs_a_cuda_device(tmp_path, capsys):
    run = tmp_path / "new-run"
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "cuda_graph=true")),
                      "cuda_graph=true needs a CUDA device", "--device cuda")
    assert not run.exists()
