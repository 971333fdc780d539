"""`fastmaml bench` runs the meta-step benchmark end to end (a functional check, not a timing)."""

import json

import pytest

from fastmaml.cli import main


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
