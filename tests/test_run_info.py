"""Issue 24, item 3: short runs. A run folder remembers the data folder it trained on (run.json) and
`eval` / `--resume` reuse it unless given `--data`; a run shorter than `log_every` still logs a curve
and its plot shows the points; `--force` says what it deletes; the eval summary is a sentence."""

import json
import os
from pathlib import Path

import pytest

from fastmaml.app import run_info
from fastmaml.app.errors import UserError

from test_cli import assert_user_error, metrics, run_cli, snapshot, train_args


def omniglot_data():
    data = os.environ.get("FASTMAML_DATA")
    if not data or not (Path(data) / "omniglot").is_dir():
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    return data


# -- the data folder a run remembers ---------------------------------------------------------------------

def test_the_folder_remembered_is_the_one_the_user_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_info.user_data_folder("data", Path("/x/omniglot"), "omniglot") == str(tmp_path / "data")
    assert run_info.user_data_folder(None, Path("/x/data/omniglot"), "omniglot") == "/x/data"
    assert run_info.user_data_folder(None, Path("/x/minis"), "miniimagenet") == "/x/minis"
    assert run_info.user_data_folder(None, None, "sinusoid") is None


def test_run_json_absent_damaged_and_written(tmp_path):
    assert run_info.data_folder(tmp_path) is None  # an old run folder, or a sinusoid run
    run_info.record(tmp_path, "/data/here")
    assert json.loads((tmp_path / "run.json").read_text()) == {"data": "/data/here"}
    assert run_info.data_folder(tmp_path) == "/data/here"
    for damaged in ('{"data": 3}', "[1]", "{", '{"data": ""}'):
        (tmp_path / "run.json").write_text(damaged)
        with pytest.raises(UserError, match=r"run.json is damaged .*--data DIR"):
            run_info.data_folder(tmp_path)


def test_sinusoid_runs_write_no_run_json(tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=2", "val_every=0")) == 0
    assert not (run / "run.json").exists()


def test_eval_and_resume_reuse_the_data_folder_of_the_run(tmp_path, capsys, monkeypatch):
    data = omniglot_data()
    run = tmp_path / "omni"
    sets = ("iterations=2", "val_every=0", "checkpoint_every=2")
    assert run_cli(*train_args("omniglot-tiny", run, *sets)) == 0  # the data from $FASTMAML_DATA
    assert json.loads((run / "run.json").read_text()) == {"data": os.path.abspath(data)}
    monkeypatch.delenv("FASTMAML_DATA")  # a new shell: the run alone says where its data is
    capsys.readouterr()
    assert run_cli("eval", run, "--episodes", "4", "--quiet") == 0
    assert "accuracy after 3 inner steps: " in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["data"] == os.path.abspath(data)
    assert run_cli(*train_args("omniglot-tiny", run, "iterations=4", *sets[1:]), "--resume") == 0
    assert [m["iter"] for m in metrics(run)] == [1, 2, 3, 4]  # log_every 10 > 4 iterations: every iteration
    capsys.readouterr()
    # an explicit --data wins (here a folder without the data: the error names it, not the remembered one)
    before = snapshot(run)
    line = assert_user_error(capsys, run_cli("eval", run, "--data", tmp_path / "elsewhere"), "omniglot data not found")
    assert str(tmp_path / "elsewhere") in line and "run.json" not in line
    # the remembered folder moved away: the error says where the folder came from and how to override it
    (run / "run.json").write_text(json.dumps({"data": str(tmp_path / "moved")}))
    line = assert_user_error(capsys, run_cli("eval", run), "omniglot data not found", str(tmp_path / "moved"),
                             f"is the one {run} trained on", f"{run / 'run.json'}", "--data DIR")
    assert_user_error(capsys, run_cli(*train_args("omniglot-tiny", run, "iterations=6", *sets[1:]), "--resume"),
                      "omniglot data not found", f"is the one {run} trained on")
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}


def test_a_relative_data_folder_is_remembered_absolute(tmp_path, monkeypatch):
    data = omniglot_data()
    (tmp_path / "here").symlink_to(os.path.abspath(data))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTMAML_DATA")
    assert run_cli(*train_args("omniglot-tiny", "run", "iterations=1", "val_every=0"), "--data", "here") == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"data": str(tmp_path / "here")}
    monkeypatch.chdir(tmp_path / "run")  # from elsewhere the remembered folder still resolves
    assert run_cli("eval", ".", "--episodes", "2", "--quiet") == 0


# -- short runs ---------------------------------------------------------------------------------------

def test_a_run_shorter_than_log_every_logs_a_tenth_of_it_and_its_plot_shows_the_points(tmp_path, capsys,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    assert run_cli("train", "sinusoid-tiny", "--out", run, "--threads", "1", "--set", "iterations=30",
                   "log_every=100", "val_every=0") == 0
    assert "a training line every 3 iterations (log_every=100 is more than the run's 30" in capsys.readouterr().err
    assert [m["iter"] for m in metrics(run) if m["split"] == "train"] == list(range(3, 31, 3))
    # log_every <= iterations: as set, and the last iteration too
    run2 = tmp_path / "run2"
    assert run_cli(*train_args("sinusoid-tiny", run2, "iterations=25", "log_every=10", "val_every=0")) == 0
    assert [m["iter"] for m in metrics(run2)] == [10, 20, 25]

    from fastmaml.app import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    one_line = [{"split": "train", "iter": 30, "loss": 2.0, "accuracy": 0.5}]
    plots.learning_curves(one_line, "t", tmp_path / "x.png")
    lines = [l for ax in drawn[0].axes for l in ax.get_lines() if l.get_label().startswith("training")]
    assert len(lines) == 2 and all(l.get_marker() not in (None, "", "None") for l in lines)


def test_force_says_what_it_deletes(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ("iterations=2", "val_every=0")
    assert run_cli(*train_args("sinusoid-tiny", run, *sets), "--force") == 0  # nothing there: nothing said
    assert "--force" not in capsys.readouterr().err
    assert run_cli(*train_args("sinusoid-tiny", run, *sets), "--force") == 0
    err = capsys.readouterr().err
    assert f"fastmaml: --force: deleting the run in {run}" in err and "to start over" in err


def test_the_sinusoid_eval_summary_is_a_complete_sentence():
    from fastmaml.app.evaluate import summary_line

    by = [{"steps": k, "mse": m} for k, m in enumerate([3.0, 0.45, 0.31, 0.3])]
    line = summary_line({"config": "c", "iteration": 9, "split": "test", "episodes": 600, "steps": 3,
                         "mse": 0.3, "mse_ci95": 0.021, "mse_by_step": by})
    assert line == ("c (iteration 9, test split): MSE after 0 inner steps: 3.00; after 1 inner step: 0.450; "
                    "after 3 inner steps: 0.300 ± 0.0210 (95% CI over 600 tasks).")
    line = summary_line({"config": "c", "iteration": 9, "split": "val", "episodes": 1, "steps": 1, "mse": 0.45,
                         "mse_ci95": None, "mse_by_step": by[:2]})
    assert line == "c (iteration 9, val split): MSE after 0 inner steps: 3.00; after 1 inner step: 0.450 (1 task)."


def test_the_python_api_says_where_it_looked_and_how_to_point_it_to_data(tmp_path, monkeypatch):
    """The README's Python example without data: one message with the folder looked in, why only
    that one, and the three ways to give it data."""
    from fastmaml.data import DataNotFound, Omniglot

    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFound) as e:
        Omniglot(split="train", ways=5, shots=1, queries=15)
    text = str(e.value)
    for part in (str(tmp_path / "cache" / "omniglot"), "$FASTMAML_DATA is unset", "root=DIR", "FASTMAML_DATA=DIR",
                 "download=True"):
        assert part in text, (part, text)
    monkeypatch.setenv("FASTMAML_DATA", str(tmp_path / "data"))  # set: it is looked in, and not called unset
    with pytest.raises(DataNotFound) as e:
        Omniglot(split="train")
    assert str(tmp_path / "data" / "omniglot") in str(e.value) and "unset" not in str(e.value)
