"""Issue 24, item 4 (startup): `fastmaml --help`, each command's `--help` and argument errors answer
without importing torch, numpy or fastmaml's engine (importing torch alone takes about 4 s here).

Each case runs `python -m fastmaml ARGS` in a fresh interpreter and lists the modules it imported
(sys.modules at exit). A control case, a command that does real work, shows that the same probe
sees torch when it is imported.
"""

import json
import subprocess
import sys

import pytest

from test_cli import subprocess_env

# Runs `python -m fastmaml` with the given arguments, then writes sys.modules to the file named in
# argv[1] at exit (whatever the exit status).
PROBE = """
import atexit, json, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["fastmaml", *args]
runpy.run_module("fastmaml", run_name="__main__", alter_sys=True)
"""

HEAVY = ("torch", "numpy", "fastmaml.maml", "fastmaml.engine", "fastmaml.checkpoint", "fastmaml.models",
         "fastmaml.distributed", "fastmaml.kernels", "fastmaml.data", "fastmaml.app.checkpoint",
         "fastmaml.app.distributed_train", "fastmaml.app.rank_context", "fastmaml.app.training_loop")


def imported_by(tmp_path, *args):
    """(exit status, stdout, stderr, modules imported) of `python -m fastmaml ARGS`."""
    out = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], capture_output=True, text=True,
                       env=subprocess_env(), cwd=tmp_path, timeout=300)
    return r.returncode, r.stdout, r.stderr, json.loads(out.read_text())


def heavy(modules):
    """The modules of ``HEAVY`` (and their submodules) among ``modules``."""
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("args, status, says", [
    (["--help"], 0, "usage: fastmaml"),
    (["train", "--help"], 0, "usage: fastmaml train"),
    (["eval", "--help"], 0, "usage: fastmaml eval"),
    (["plot", "--help"], 0, "usage: fastmaml plot"),
    (["configs", "--help"], 0, "usage: fastmaml configs"),
    (["bench", "--help"], 0, "usage: fastmaml bench"),
    (["configs", "sinusoid-tiny"], 0, "inner_lr"),
    (["train"], 2, "the following arguments are required: config"),
    (["train", "nope"], 2, "unknown config 'nope'"),
    (["train", "sinusoid-tiny", "--threads", "x"], 2, "--threads: invalid int value"),
    (["train", "sinusoid-tiny", "--set", "inner_lrr=1"], 2, "unknown key 'inner_lrr'"),
    (["eval", "run", "--episodes", "0"], 2, "--episodes"),
])
def test_help_and_argument_errors_import_no_torch(tmp_path, args, status, says):
    rc, out, err, modules = imported_by(tmp_path, *args)
    assert rc == status, (out, err)
    assert says in out + err
    assert "fastmaml.app.cli" in modules  # the probe ran the command
    assert not heavy(modules), f"`fastmaml {' '.join(args)}` imported {heavy(modules)[:8]}"


def test_the_probe_sees_torch_where_a_command_works(tmp_path):
    """The control: `eval` of a missing run gets as far as choosing the device, which needs torch."""
    rc, out, err, modules = imported_by(tmp_path, "eval", str(tmp_path / "none"))
    assert rc == 2 and "no such run folder" in err
    assert "torch" in heavy(modules)


def test_package_attributes_are_imported_on_first_use():
    code = ("import sys, fastmaml; assert 'torch' not in sys.modules; "
            "from fastmaml import MAML, ANIL; import fastmaml.maml, fastmaml.algorithms; "
            "assert MAML is fastmaml.maml.MAML and ANIL is fastmaml.algorithms.ANIL; "
            "assert fastmaml.models.conv4 and fastmaml.Reptile and 'MAML' in dir(fastmaml); "
            "ns = {}; exec('from fastmaml import *', ns); assert ns['IMAML'] is fastmaml.IMAML; "
            "print(hasattr(fastmaml, 'no_such_name'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_run_file_names_agree_with_the_checkpoint_module():
    from fastmaml.app import checkpoint, run_folder

    assert checkpoint.FILENAME in run_folder.RUN_FILES[:3] and checkpoint.PREV_FILENAME in run_folder.RUN_FILES
