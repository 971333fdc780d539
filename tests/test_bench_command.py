"""`fastmaml bench` runs the meta-step benchmark end to end (a functional check, not a timing)."""

import json
from pathlib import Path

import pytest

from fastmaml.app.cli import main


def test_bench_command_runs_and_checks_gradients(tmp_path, capsys):
    rc = main(["bench", "--workloads", "sinusoid", "--tasks", "3", "--steps", "2", "--impls", "engine,reference",
               "--repeats", "1", "--threads", "1", "--out", str(tmp_path), "--name", "smoke"])
    assert rc == 0
    (path,) = tmp_path.glob("smoke_*.json")
    result = json.loads(path.read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "reference"} and not result["partial"]
    # every implementation, the float32 reference too, is checked against the reference in float64
    assert result["gradient_oracle"] == "reference, float64"
    for r in rows.values():
        assert r["same_gradient"] and 0 < r["grad_rel_err"] < 1e-5
    assert rows["engine"]["ms"] > 0 and "speedup_vs_reference" in rows["engine"]
    assert result["machine"]["torch"]


def _bench_module(name):
    import importlib
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_group_runner_reports_each_configuration_and_its_errors():
    """One worker process for several configurations (what --group does on CUDA): one result per
    configuration, in order, a failing one reported without losing the others."""
    b = _bench_module("bench_meta_step")
    cfg = dict(workload="sinusoid", steps=1, device="cpu", first_order=False, repeats=1, warmup=0, threads=1)
    out = b.run_group([dict(cfg, tasks=2, impl="engine"), dict(cfg, tasks=2, impl="engine-graph"),
                       dict(cfg, tasks=3, impl="engine")], timeout=120)
    assert [("grad" in r, "error" in r) for r in out] == [(True, False), (False, True), (True, False)]
    assert "CUDA device" in out[1]["error"]
    assert out[0]["grad"].shape == out[2]["grad"].shape and out[2]["median_s"] > 0


def test_spent_budget_leaves_rows_marked_not_run(tmp_path):
    rc = main(["bench", "--workloads", "sinusoid", "--tasks", "2", "--steps", "1", "2", "--impls", "engine",
               "--repeats", "1", "--threads", "1", "--budget", "0.5", "--out", str(tmp_path), "--name", "budget"])
    assert rc == 0
    (path,) = tmp_path.glob("budget_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2 and all("not run" in r["error"] for r in rows)


def test_merge_keeps_the_later_row_and_recomputes_ratios(tmp_path):
    merge = _bench_module("merge_results")
    machine = {"device_name": "X", "torch": "t"}

    def part(name, rows):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"machine": machine, "args": {"name": name}, "rows": rows}))
        return str(p)

    row = dict(workload="sinusoid", T=4, K=1, peak_mib=1.0)
    a = part("a", [dict(row, impl="learn2learn", ms=10.0), dict(row, impl="engine", ms=5.0, speedup_vs_x=9)])
    b = part("b", [dict(row, impl="engine", ms=2.0)])
    result = merge.merge([a, b])
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["engine"]["ms"] == 2.0 and rows["engine"]["speedup_vs_learn2learn"] == 5.0
    assert "speedup_vs_x" not in rows["engine"] and len(result["parts"]) == 2
    other = tmp_path / "c.json"
    other.write_text(json.dumps({"machine": {"device_name": "Y"}, "args": {}, "rows": []}))
    with pytest.raises(SystemExit, match="different machines"):
        merge.merge([a, str(other)])


# -- issue 24, item 4: where `fastmaml bench` writes, its help, and why a gradient differs -----------------

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--workloads", "sinusoid", "--tasks", "2", "--steps", "1", "--impls", "engine", "--repeats", "1",
         "--threads", "1", "--name", "quick"]


def test_bench_writes_to_the_current_folder_not_the_source_tree(tmp_path, monkeypatch, capsys):
    results = REPO / "bench" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *QUICK]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["quick_cpu.json"]
    assert (sorted(p.name for p in results.iterdir()) if results.is_dir() else []) == before


def test_bench_refuses_the_package_and_a_default_inside_the_source_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["bench", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmaml: error: fastmaml bench writes its results to the current folder, here the "
                          f"fastmaml source tree ({REPO}); pass --out DIR") and len(err.splitlines()) == 1
    assert main(["bench", *QUICK, "--out", str(REPO / "fastmaml" / "results")]) == 2
    assert "inside the fastmaml package" in capsys.readouterr().err
    assert not (REPO / "fastmaml" / "results").exists() and not (REPO / "quick_cpu.json").exists()
    from test_cli import run_cli

    assert run_cli("bench", "--tasks", "x") == 2  # checked before anything runs, in one line
    assert capsys.readouterr().err.startswith("fastmaml: error: argument --tasks: invalid int value: 'x'")


def test_bench_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for part in ("usage: fastmaml bench", "Time and peak memory of one MAML meta-step", "--workloads W",
                 "omniglot-mlp-5w1s", "--impls", "--out DIR", "default: the current folder", "same_gradient"):
        assert part in out, part


def test_the_checked_arguments_reach_the_script_unchanged():
    import argparse

    args_mod = _bench_module("meta_step_args")
    parser = argparse.ArgumentParser()
    args_mod.add_arguments(parser, out_help="")
    given = parser.parse_args(["--device", "cpu", "--workloads", "sinusoid", "omniglot-20w5s", "--tasks", "3", "7",
                               "--steps", "2", "--impls", "engine,torch_func", "--first-order", "--oracle", "first",
                               "--tf32", "--repeats", "4", "--warmup", "2", "--sweep", "--group", "--threads", "3",
                               "--timeout", "12.5", "--budget", "0.25", "--name", "n", "--out", "/x y"])
    defaults = vars(parser.parse_args([]))
    assert all(vars(given)[k] != defaults[k] for k in defaults)  # every option is exercised
    assert parser.parse_args(args_mod.to_argv(given)) == given
    assert parser.parse_args(args_mod.to_argv(parser.parse_args([]))) == parser.parse_args([])
    assert set(_bench_module("bench_meta_step").WORKLOADS) == set(args_mod.WORKLOAD_NAMES)


def _row(workload, impl, err, K=1):
    return dict(workload=workload, T=4, K=K, impl=impl, grad_rel_err=err)


def test_a_gradient_mismatch_says_how_far_off_and_why():
    """torch_func's known BatchNorm bug is named with the numbers, and torch_func_bnfix's agreement;
    a mismatch without a known cause says so instead of guessing."""
    b = _bench_module("bench_meta_step")
    rows = [_row("omniglot-5w1s", "reference", 3.5e-5), _row("omniglot-5w1s", "torch_func", 4.2e-3),
            _row("omniglot-5w1s", "torch_func_bnfix", 3.4e-5), _row("sinusoid", "reference", 2.5e-7),
            _row("sinusoid", "torch_func", 5e-2), _row("sinusoid", "engine", 2e-7)]
    b.judge_gradients(rows)
    lines = b.explain_gradients(rows, first_order=False, oracle="reference, float64")
    assert len(lines) == 2 and [r["same_gradient"] for r in rows] == [True, False, True, True, False, True]
    bn, other = rows[1]["gradient_note"], rows[4]["gradient_note"]
    assert bn.startswith("relative error 4.2e-03 to the oracle (reference, float64), above the tolerance 1.0e-03")
    assert "batch_norm's backward" in bn and "torch_func_bnfix" in bn and "(here 3.4e-05 from the oracle)" in bn
    assert "cause unknown" in other and "batch_norm" not in other
    assert lines[0].startswith("omniglot-5w1s T=4 K=1 torch_func: same_gradient=False: relative error 4.2e-03")
    b.explain_gradients(rows, first_order=True, oracle="x")  # the bug is second order: no excuse at first order
    assert "cause unknown" in rows[1]["gradient_note"]
    assert "gradient_note" not in rows[0] and "gradient_note" not in rows[5]
