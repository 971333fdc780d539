"""Checkpoints: weights_only loading, RNG round trips, atomic writes (a crash mid-write leaves the
previous checkpoint), corrupt files refused whole, and kill -9 + --resume == an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastmaml.app import checkpoint as ckpt_mod
from fastmaml.app.checkpoint import CheckpointError

from test_cli import assert_user_error, run_cli, snapshot, subprocess_env, train_args


def _fake_checkpoint(iteration=3, value=1.0):
    return {
        "format": ckpt_mod.FORMAT, "version": ckpt_mod.VERSION, "iteration": iteration,
        "config": {"config": "sinusoid-tiny"}, "model": {"w": torch.full((4,), value)}, "inner_lr": {"lr": torch.tensor(0.1)},
        "optimizer": {"state": {}, "param_groups": []}, "rng": ckpt_mod.capture_rng({"generator_state": torch.zeros(3, dtype=torch.uint8)}),
        "progress": {"elapsed": 0.0, "window": {"loss": 0.0, "accuracy": 0.0, "count": 0}},
    }


def _flatten(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, x


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


# -- format -------------------------------------------------------------------------------------------

def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1)  # a cached gaussian in Python's state
    np.random.randn()
    state = ckpt_mod.capture_rng()
    ckpt_mod.save(tmp_path / "c.pt", {"rng": state})
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]
    ckpt_mod.restore_rng(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_saved_checkpoint_is_weights_only_loadable_and_validated(tmp_path):
    p = tmp_path / "checkpoint.pt"
    ckpt_mod.save(p, _fake_checkpoint())
    assert torch.load(p, weights_only=True)["iteration"] == 3
    assert ckpt_mod.load(p)["iteration"] == 3
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # ordinary permissions, not mkstemp's
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]


class Unsafe:  # an arbitrary object: weights_only refuses to unpickle it
    pass


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-checkpoint", "unsafe-pickle",
                                    "missing-optimizer"])
def test_corrupt_checkpoints_are_refused(tmp_path, damage):
    p = tmp_path / "checkpoint.pt"
    ckpt_mod.save(p, _fake_checkpoint())
    data = p.read_bytes()
    if damage == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(2)}, p)
    elif damage == "unsafe-pickle":
        torch.save(dict(_fake_checkpoint(), extra=Unsafe()), p)
    else:
        c = _fake_checkpoint()
        del c["optimizer"]
        torch.save(c, p)
    with pytest.raises(CheckpointError, match="corrupt|not a fastmaml checkpoint") as e:
        ckpt_mod.load(p)
    assert "not loaded" in str(e.value)


# -- atomic writes ------------------------------------------------------------------------------------

def test_failed_replace_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    ckpt_mod.save(p, _fake_checkpoint(iteration=1, value=1.0))
    before = p.read_bytes()

    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        ckpt_mod.save(p, _fake_checkpoint(iteration=2, value=2.0))
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert ckpt_mod.load(p)["iteration"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]  # the temporary file was removed


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from fastmaml.app import checkpoint as c
    path, where = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "mid-write":
        def write(f):
            data = b"PK" + os.urandom(50000)
            f.write(data[:20000]); f.flush()
            die()
        c.atomic_write_bytes(path, write)
    else:  # the whole temporary file is written; killed before the rename
        c.os.replace = die
        c.save(path, {"format": c.FORMAT, "version": 99})
""")


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, where):
    p = tmp_path / "checkpoint.pt"
    ckpt_mod.save(p, _fake_checkpoint(iteration=7))
    before = p.read_bytes()
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(p), where], env=subprocess_env(), timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert p.read_bytes() == before and ckpt_mod.load(p)["iteration"] == 7
    leftovers = [f.name for f in tmp_path.iterdir() if f.name != "checkpoint.pt"]
    assert leftovers and all(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in leftovers)
    ckpt_mod.remove_stale_temporaries(tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]


# -- corrupt checkpoints through the command line -----------------------------------------------------

def test_cli_refuses_a_corrupt_checkpoint_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=4", "checkpoint_every=2", "val_every=0")) == 0
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) - 100])
    (run / "checkpoint.prev.pt").unlink()  # no previous checkpoint to fall back to (test_checkpoint_integrity.py)
    before = snapshot(run)
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=8", "checkpoint_every=2",
                                                  "val_every=0"), "--resume"), "corrupt", "not loaded")
    assert snapshot(run) == before
    assert_user_error(capsys, run_cli("eval", run, "--quiet"), "corrupt", "not loaded")
    assert snapshot(run) == before


@pytest.mark.parametrize("part", ["model", "optimizer", "sampler"])
def test_cli_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys, part):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=2", "val_every=0")) == 0
    c = torch.load(run / "checkpoint.pt", weights_only=True)
    if part == "model":
        c["model"]["0.weight"] = torch.zeros(3, 1)
        expected = "0.weight"
    elif part == "optimizer":
        c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 1)
        expected = "exp_avg"
    else:
        c["rng"]["sampler"] = {"generator_state": "nonsense"}
        expected = "sampler state"
    torch.save(c, run / "checkpoint.pt")
    before = snapshot(run)
    if part == "model":
        assert_user_error(capsys, run_cli("eval", run, "--quiet"), expected, "not loaded")
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=4", "val_every=0"), "--resume"),
                      expected, "not loaded")
    assert snapshot(run) == before


# -- kill -9 and resume ---------------------------------------------------------------------------------

def test_sigkill_then_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    iterations = 240
    args = ["-m", "fastmaml", "train", "sinusoid-tiny", "--threads", "1", "--quiet", "--set",
            f"iterations={iterations}", "checkpoint_every=10", "log_every=1", "val_every=40", "val_episodes=4"]
    env = subprocess_env()
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run([sys.executable, *args, "--out", str(ref)], env=env, check=True, timeout=300)

    proc = subprocess.Popen([sys.executable, *args, "--out", str(run)], env=env)
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.1)  # somewhere past the checkpoint, maybe inside the next one
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = ckpt_mod.load(run / "checkpoint.pt")["iteration"]
    assert 0 < killed_at < iterations, killed_at

    subprocess.run([sys.executable, *args, "--out", str(run), "--resume"], env=env, check=True, timeout=300)

    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == iterations
    for key in ("model", "inner_lr", "optimizer", "rng", "config"):
        fa, fb = dict(_flatten(a[key])), dict(_flatten(b[key]))
        assert fa.keys() == fb.keys(), key
        diff = [k for k in fa if not _same(fa[k], fb[k])]
        assert not diff, (key, diff)

    def stable(run_dir):
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tasks_per_s", "elapsed")} for r in rows]

    ma, mb = stable(ref), stable(run)
    assert len(ma) == iterations + iterations // 40
    assert ma == mb
