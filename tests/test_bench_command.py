"""`fastmaml bench` runs the meta-step benchmark end to end (a functional check, not a timing)."""

import json

from fastmaml.cli import main


def test_bench_command_runs_and_checks_gradients(tmp_path, capsys):
    rc = main(["bench", "--workloads", "sinusoid", "--tasks", "3", "--steps", "2", "--impls", "engine,reference",
               "--repeats", "1", "--threads", "1", "--out", str(tmp_path), "--name", "smoke"])
    assert rc == 0
    (path,) = tmp_path.glob("smoke_*.json")
    result = json.loads(path.read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "reference"} and not result["partial"]
    assert rows["engine"]["same_gradient"] and rows["engine"]["grad_rel_err"] < 1e-5
    assert rows["engine"]["ms"] > 0 and "speedup_vs_reference" in rows["engine"]
    assert result["machine"]["torch"]
