"""Issue 13, items 9, 10 and 12: a damaged checkpoint is refused naming the file (CRC of every zip
member), the previous one (``checkpoint.prev.pt``) is kept and used instead (saying so), and
everything (RNG states, the iteration's range, finite weights) is validated before anything is
restored: one clear line from train, eval and plot alike."""

import json
import random
import zipfile

import numpy as np
import pytest
import torch

from fastmaml.app import checkpoint as ckpt_mod
from fastmaml.app.checkpoint import CheckpointError

from test_checkpoint import _fake_checkpoint
from test_cli import assert_user_error, run_cli, snapshot, train_args

SETS = ("iterations=4", "checkpoint_every=2", "val_every=0", "log_every=2")


def flip_tensor_byte(path, member_suffix="data/0"):
    """Flip one byte in the middle of a tensor's stored data (the zip's structure stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_args("sinusoid-tiny", run, *SETS)) == 0
    return run


# -- 9. integrity and the previous checkpoint --------------------------------------------------------

def test_a_flipped_byte_in_tensor_data_is_refused(tmp_path):
    p = tmp_path / "checkpoint.pt"
    c = _fake_checkpoint()
    c["model"]["w"] = torch.randn(1000)
    ckpt_mod.save(p, c)
    with zipfile.ZipFile(p) as zf:
        member = next(n for n in zf.namelist() if n.endswith("data/0"))
    flip_tensor_byte(p)
    torch.load(p, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=rf"checkpoint {p} is corrupt: the CRC of its member .*data/0") as e:
        ckpt_mod.load(p)
    assert "not loaded" in str(e.value) and member in str(e.value)


def test_training_keeps_the_previous_checkpoint(run):
    assert ckpt_mod.load(run / "checkpoint.pt")["iteration"] == 4
    assert ckpt_mod.load(run / "checkpoint.prev.pt")["iteration"] == 2


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(run, capsys):
    flip_tensor_byte(run / "checkpoint.pt")
    capsys.readouterr()
    assert run_cli("eval", run, "--quiet", "--episodes", "4") == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(run / "checkpoint.pt") in err and "CRC" in err
    assert f"using the previous checkpoint {run / 'checkpoint.prev.pt'} (iteration 2)" in err
    assert json.loads((run / "eval.json").read_text())["iteration"] == 2
    # resume goes on from the previous checkpoint, and does not rotate the damaged file over it
    assert run_cli(*train_args("sinusoid-tiny", run, "iterations=6", *SETS[1:]), "--resume") == 0
    assert "using the previous checkpoint" in capsys.readouterr().err
    assert ckpt_mod.load(run / "checkpoint.pt")["iteration"] == 6
    assert ckpt_mod.load(run / "checkpoint.prev.pt")["iteration"] == 4
    iters = [m["iter"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert iters == [2, 4, 6]


def test_both_damaged_is_refused_naming_both(run, capsys):
    flip_tensor_byte(run / "checkpoint.pt")
    flip_tensor_byte(run / "checkpoint.prev.pt")
    before = snapshot(run)
    line = assert_user_error(capsys, run_cli("eval", run, "--quiet"), "checkpoint.pt is corrupt",
                             "checkpoint.prev.pt is corrupt")
    assert "unusable too" in line
    assert snapshot(run) == before


# -- 10. validate everything before restoring anything ------------------------------------------------

def _damage(run, change):
    c = torch.load(run / "checkpoint.pt", weights_only=True)
    change(c)
    torch.save(c, run / "checkpoint.pt")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)  # nothing to fall back to


def _python_rng(c):
    c["rng"]["python"]["state"][5] = 2 ** 40


def _numpy_rng(c):
    c["rng"]["numpy"]["keys"][3] = -7


def _numpy_pos(c):
    c["rng"]["numpy"]["pos"] = 10 ** 6


def _torch_rng(c):
    c["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)


@pytest.mark.parametrize("change,expected", [(_python_rng, "Python RNG state"), (_numpy_rng, "numpy RNG state"),
                                             (_numpy_pos, "numpy RNG state"), (_torch_rng, "torch RNG state")])
def test_damaged_rng_state_is_refused_before_anything_is_restored(run, capsys, change, expected):
    _damage(run, change)
    before = snapshot(run)
    rng_before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=6", *SETS[1:]), "--resume"),
                      expected, "not loaded")
    assert snapshot(run) == before
    assert torch.equal(rng_before[0], torch.get_rng_state()) and np.array_equal(rng_before[1], np.random.get_state()[1])
    assert rng_before[2] == random.getstate()
    with pytest.raises(CheckpointError, match=expected):
        ckpt_mod.load(run / "checkpoint.pt")


def test_an_iteration_beyond_the_run_is_refused(run, capsys):
    _damage(run, lambda c: c.update(iteration=10 ** 9))
    before = snapshot(run)
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=6", *SETS[1:]), "--resume"),
                      "iteration 1000000000 is beyond the run's 4 iterations", "not loaded")
    assert_user_error(capsys, run_cli("eval", run, "--quiet"), "beyond the run's 4 iterations")
    assert snapshot(run) == before


# -- 12. a NaN weight: one clear line everywhere -------------------------------------------------------

def test_a_nan_weight_gives_one_line_from_train_eval_and_plot(run, capsys):
    def nan(c):
        c["model"]["0.weight"][0, 0] = float("nan")
    _damage(run, nan)
    before = snapshot(run)
    assert_user_error(capsys, run_cli("eval", run, "--quiet"), "model tensor 0.weight holds NaN or Inf", "not loaded")
    assert_user_error(capsys, run_cli("plot", run), "model tensor 0.weight holds NaN or Inf", "not loaded")
    assert_user_error(capsys, run_cli(*train_args("sinusoid-tiny", run, "iterations=6", *SETS[1:]), "--resume"),
                      "model tensor 0.weight holds NaN or Inf", "not loaded")
    assert snapshot(run) == before
