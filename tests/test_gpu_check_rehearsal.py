"""bench/gpu_check.sh --dry-run: every step of the GPU check is rehearsed here, without a GPU, so that a
renamed script, option, workload, implementation list argument or test file fails CI rather than a
scarce GPU session. The dry run checks that each command exists and that its arguments parse
(python scripts: the step's arguments then --help; pytest: --collect-only of its tests; bash -n).
About 25 s of CPU.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_TESTS = ("test_cuda_graph.py", "test_engine_cuda.py", "test_kernels.py", "test_triton_kernels.py",
             "test_cpp_kernels.py", "test_layers_triton.py")
STEPS = ("versions", "build (", "kernel backends", "C++ exception probe", "baselines", "CUDA and Triton tests",
         "standard workload", "profile engine", "profile engine-graph", "layer kernels", "sweep sinusoid",
         "sweep omniglot-5w1s", "sweep sinusoid learn2learn", "sweep omniglot-20w5s", "merge sweep")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu_check_dry_run")
    # The venv's python first: the script calls `python`.
    env = dict(os.environ, OUT=str(out), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    return r, out


def test_every_step_rehearses(dry_run):
    r, out = dry_run
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, f"dry run exited {r.returncode}:\n{summary}\n--- output ---\n{r.stdout[-6000:]}"
    lines = summary.splitlines()
    assert lines and all(re.match(r"(PASS|SKIP) ", ln) for ln in lines), summary
    names = [ln.split("  ", 1)[1] for ln in lines]
    for step in STEPS:
        assert any(n.startswith(step) for n in names), f"no step {step!r} in the summary:\n{summary}"
    assert any(n.startswith("bash -n") for n in names)
    assert re.search(r"gpu_check --dry-run: \d+ steps passed, 0 failed", r.stdout), r.stdout[-2000:]


def test_the_gpu_tests_are_collected(dry_run):
    _, out = dry_run
    collected = dict(re.findall(r"^tests/(\S+\.py): (\d+)$", (out / "tests.log").read_text(), re.M))
    for name in GPU_TESTS:
        assert int(collected.get(name, 0)) > 0, f"{name} collected no test in the dry run: {collected}"
