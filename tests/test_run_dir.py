"""Issue 13, items 8, 11, 13, 15 and 16: the run folder is locked against a second trainer, a
read-only folder is reported in one line before any work, a missing packaged file is named as such,
the printed resume command works as printed, and a stopped run leaves a metrics line."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastmaml import maml as maml_mod
from fastmaml.app import checkpoint as ckpt_mod
from fastmaml.app import evaluate as eval_mod

from test_cli import assert_user_error, metrics, run_cli, snapshot, subprocess_env, train_args

SETS = ("iterations=4", "checkpoint_every=2", "val_every=0", "log_every=2")


# -- 8. one trainer per run folder ----------------------------------------------------------------------

def test_a_second_live_trainer_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["-m", "fastmaml", "train", "sinusoid-tiny", "--out", str(run), "--threads", "1", "--quiet",
            "--set", "iterations=1000000", "checkpoint_every=5", "val_every=0"]
    proc = subprocess.Popen([sys.executable, *args], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        line = assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=20"), "--force"),
                                 f"{run} is in use by another fastmaml train (pid {proc.pid}")
        assert "train.lock" in line
        assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=1000000", "checkpoint_every=5",
                                                      "val_every=0"), "--resume"), "in use by another fastmaml train")
        assert proc.poll() is None  # the first trainer goes on, its run untouched
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    (run / "train.lock").write_text(f"{dead.pid}\n")
    assert run_cli(*train_args("sinusoid-tiny", run, *SETS)) == 0
    assert not (run / "train.lock").exists()
    assert ckpt_mod.load(run / "checkpoint.pt")["iteration"] == 4


def test_the_lock_is_released_and_a_refused_start_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "a" / "b" / "run"
    assert_user_error(capsys, run_cli(*train_args("omniglot-tiny", run), "--data", tmp_path / "nowhere"),
                      "data not found")
    assert not (tmp_path / "a").exists()
    assert run_cli(*train_args("sinusoid-tiny", run, *SETS)) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                      "metrics.jsonl"]


# -- 11. a read-only run folder: one line, before any work --------------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: chmod, and (root ignores permission bits) file creation in them fails
    the way a read-only mount makes it fail."""
    folders = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, **kw):
        d = kw.get("dir")
        if d is not None and any(Path(d).resolve() == f or f in Path(d).resolve().parents for f in folders):
            raise PermissionError(13, "Permission denied", str(d))
        return real_mkstemp(*a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def make(folder):
        folders.append(Path(folder).resolve())
        for p in [folder, *Path(folder).rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)

    yield make
    for f in folders:
        for p in [f, *f.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


@pytest.fixture
def trained_run(tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, *SETS)) == 0
    return run


def test_eval_in_a_read_only_run_folder_fails_first_in_one_line(trained_run, read_only, capsys, monkeypatch):
    read_only(trained_run)
    before = snapshot(trained_run)
    ran = []
    real = eval_mod.evaluate
    monkeypatch.setattr(eval_mod, "evaluate", lambda *a, **k: ran.append(1) or real(*a, **k))
    line = assert_user_error(capsys, run_cli("eval", trained_run, "--quiet"), "cannot write eval.json to",
                             str(trained_run), "not writable")
    assert not ran, "episodes were evaluated before the write failed"
    assert "Traceback" not in line
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("how", ["--resume", "--force"])
def test_train_in_a_read_only_run_folder_fails_first_in_one_line(trained_run, read_only, capsys, how):
    read_only(trained_run)
    before = snapshot(trained_run)
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", trained_run, "iterations=6", *SETS[1:]), how),
                      "cannot write the run to", "not writable", "--out")
    assert snapshot(trained_run) == before


def test_plot_in_a_read_only_run_folder_fails_first_in_one_line(trained_run, read_only, capsys):
    read_only(trained_run)
    before = snapshot(trained_run)
    assert_user_error(capsys, run_cli("plot", trained_run), "cannot write the plots to", "not writable")
    assert snapshot(trained_run) == before


# -- 13. a missing packaged split file ----------------------------------------------------------------------

def test_a_missing_packaged_split_file_is_named_as_such(tmp_path, capsys, monkeypatch):
    from fastmaml.data import splits

    monkeypatch.setattr(splits.resources, "files", lambda package: tmp_path / "broken-install")
    line = assert_user_error(capsys, run_cli(*train_args("omniglot-tiny", tmp_path / "run"), "--data", tmp_path),
                             "packaged split file fastmaml/data/splits/vinyals/train.txt is missing", "reinstall")
    assert "data not found" not in line


# -- 15 and 16. Ctrl-C: a resume command that works as printed, a metrics line -----------------------------

@pytest.fixture
def interrupt_after(monkeypatch):
    """Deliver SIGINT (Ctrl-C) to this process during meta-step number n."""
    def arm(n):
        real = maml_mod.MAML.meta_step
        calls = [0]

        def meta_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, *a, **k)

        monkeypatch.setattr(maml_mod.MAML, "meta_step", meta_step)
        return calls
    return arm


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in ("tasks_per_s", "elapsed")} for r in rows]


def test_ctrl_c_leaves_a_metrics_line_and_resumes_to_the_same_metrics(tmp_path, capsys, interrupt_after, monkeypatch):
    sets = ("iterations=12", "checkpoint_every=100", "val_every=0", "log_every=5")
    ref = tmp_path / "ref"
    assert run_cli(*train_args("sinusoid-tiny", ref, *sets)) == 0
    run = tmp_path / "run"
    interrupt_after(3)
    assert run_cli(*train_args("sinusoid-tiny", run, *sets)) == 130
    err = capsys.readouterr().err
    assert "stopped at iteration 3/12" in err
    rows = metrics(run)
    assert [(r["iter"], r.get("partial")) for r in rows] == [(3, True)]
    assert run_cli("plot", run) == 0  # not "train it first"
    monkeypatch.undo()
    command = err.split("Continue with: ", 1)[1].strip()
    assert command.endswith("--resume") and command.count("--resume") == 1
    assert f"--out {run}" in command and "--threads 1" in command and "--set " + " ".join(sets) in command
    argv = command.split()
    assert argv[:2] == ["fastmaml", "train"]
    assert run_cli(*argv[1:]) == 0
    assert _stable(metrics(run)) == _stable(metrics(ref))


def test_plot_names_the_real_cause_when_no_line_was_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, *SETS)) == 0
    (run / "metrics.jsonl").write_text("")
    assert_user_error(capsys, run_cli("plot", run), "metrics.jsonl has no metric lines yet",
                      "stopped before its first log line (log_every=2)")


def test_the_resume_command_names_the_data_folder_used(tmp_path, capsys, interrupt_after, monkeypatch):
    data = os.environ.get("FASTMAML_DATA")
    if not data or not (Path(data) / "omniglot").is_dir():
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    run = tmp_path / "omni"
    interrupt_after(1)
    assert run_cli(*train_args("omniglot-tiny", run, "iterations=4", "val_every=0")) == 130
    err = capsys.readouterr().err
    command = err.split("Continue with: ", 1)[1].strip()
    # the folder the user named (here $FASTMAML_DATA, the folder holding omniglot/), not omniglot/ itself
    assert f"--data {os.path.abspath(data)} " in command
    monkeypatch.undo()
    monkeypatch.delenv("FASTMAML_DATA")  # a fresh shell: the command alone must work
    assert run_cli(*command.split()[1:]) == 0
    assert ckpt_mod.load(run / "checkpoint.pt")["iteration"] == 4


def test_without_flock_the_owners_pid_decides(tmp_path, monkeypatch):
    """On a file system without flock, a lock whose pid is alive is held, a dead one's is stale."""
    import errno
    import fcntl

    from fastmaml import fsutil

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "train.lock").write_text(f"{alive.pid}\n")
        with pytest.raises(fsutil.LockHeld) as e:
            fsutil.RunLock(tmp_path).acquire()
        assert e.value.pid == alive.pid
    finally:
        alive.kill()
        alive.wait(timeout=60)
    lock = fsutil.RunLock(tmp_path).acquire()  # the owner is dead now: taken over
    assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not (tmp_path / "train.lock").exists()
