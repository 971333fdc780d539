"""Every Triton kernel of the package compiles for sm_80 and sm_90 and can launch there, without a GPU.

Runs ``bench/triton_compile_check.py`` (in its own process: this one runs Triton's interpreter) and
checks its report: no failure, both targets, and the kernels it compiled are exactly the package's
``@triton.jit`` kernels, found here independently by parsing the sources of ``fastmaml/triton/``
(a kernel is a jit function that no other jit function calls; the others are device helpers).
About 130 s of CPU (70 s on 2 idle cores).
"""

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECK = ROOT / "bench" / "triton_compile_check.py"
TARGETS = ("sm_80", "sm_90")


def _ptxas_missing() -> str:
    """Why the check cannot run here ("" when it can): triton absent, or without its CUDA backend."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    ptxas = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return "" if ptxas.exists() else f"this triton has no CUDA backend with ptxas ({ptxas} is missing)"


pytestmark = pytest.mark.skipif(bool(_ptxas_missing()), reason=_ptxas_missing() or "n/a")


def _jit_kernels_in_sources() -> set:
    """Names of the @triton.jit functions of fastmaml/triton/**/*.py that no other jit function calls (names are
    unique across the package's modules; a helper may be called from another module)."""
    jit, calls = {}, {}
    for path in sorted((ROOT / "fastmaml" / "triton").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if any(d in ("triton.jit", "jit") or d.startswith(("triton.jit(", "jit(")) for d in decorators):
                jit[node.name] = path.name
                calls[node.name] = {c.func.id for c in ast.walk(node)
                                    if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    called = set().union(*calls.values()) if calls else set()
    return {name for name in jit if name not in called}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = max(1, min(4, len(os.sched_getaffinity(0))))
    cmd = [sys.executable, str(CHECK), "--targets", *TARGETS, "--jobs", str(jobs), "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=1800)
    failures = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAIL", "MISSING", "Traceback"))]
    assert r.returncode == 0, (f"{' '.join(cmd)} exited {r.returncode}:\n" + "\n".join(failures[:40])
                               + "\n--- last lines ---\n" + "\n".join(r.stdout.splitlines()[-15:]))
    return json.loads(out.read_text())


def test_every_launch_compiles_and_fits_both_targets(report):
    results = report["results"]
    assert results, "the check compiled nothing"
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['config']}] {r['target']}: {r['why']}" for r in bad[:20])
    for r in results:  # resources read back from ptxas and the metadata, within the target's limits
        limits = report["targets"][r["target"]]
        assert 0 < r["regs"] <= limits["max_regs_per_thread"], r
        assert 0 <= r["shared"] <= limits["max_shared"], r
    per_target = {t: {(r["kernel"], r["config"]) for r in results if r["target"] == t} for t in TARGETS}
    assert per_target["sm_80"] == per_target["sm_90"] and per_target["sm_80"], "targets compiled different launches"


def test_checked_kernels_are_exactly_the_jit_kernels_of_the_package(report):
    in_sources = _jit_kernels_in_sources()
    assert len(in_sources) >= 12, f"found only {sorted(in_sources)} in fastmaml/triton/**/*.py"
    checked = {r["kernel"] for r in report["results"]}
    assert checked == in_sources, (f"kernels never compiled: {sorted(in_sources - checked)}; "
                                   f"compiled but not found in the sources: {sorted(checked - in_sources)}")
    assert report["missing"] == []
    for kernel in checked:  # every kernel in float32 and in float64, on both targets
        configs = [r["config"] for r in report["results"] if r["kernel"] == kernel]
        for dtype in ("fp32", "fp64"):
            assert any(c.startswith(dtype) for c in configs), f"{kernel} never compiled with {dtype} pointers"


# The launch rules and the ptxas log reader, on known numbers (the module imports triton lazily).
sys.path.insert(0, str(ROOT / "bench"))
import triton_compile_check as tcc  # noqa: E402


def test_launch_rules():
    sm80, sm90 = tcc.TARGETS["sm_80"], tcc.TARGETS["sm_90"]
    assert tcc.launch_problems(sm80, 4, 255, 0, None, 0) == []  # 4 warps x 256 registers = 32,768
    assert tcc.launch_problems(sm80, 8, 255, 0, None, 0) == []  # exactly 65,536
    # 72 registers allocate as 9 x 256 per warp: 32 warps need 73,728 > 65,536; 64 registers fit exactly
    assert any("registers per block" in p for p in tcc.launch_problems(sm90, 32, 72, 0, None, 0))
    assert tcc.launch_problems(sm90, 32, 64, 0, None, 0) == []
    assert any("threads" in p for p in tcc.launch_problems(sm90, 64, 16, 0, None, 0))
    shared = 163 * 1024 + 1  # over sm_80's opt-in maximum, within sm_90's
    assert any("shared memory" in p for p in tcc.launch_problems(sm80, 4, 32, shared, None, 0))
    assert tcc.launch_problems(sm90, 4, 32, shared, None, 0) == []
    assert any("shared memory" in p for p in tcc.launch_problems(sm90, 4, 32, 227 * 1024 + 1, None, 0))
    assert tcc.launch_problems(sm90, 4, 32, 0, None, 64) == []  # spills are reported, not failed...
    assert any("spills" in p for p in tcc.launch_problems(sm90, 4, 32, 0, 0, 64))  # ...unless --max-spills


def test_ptxas_log_reader():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_conv_cin1_wgrad_kernel' for 'sm_90a'
ptxas info    : Function properties for _conv_cin1_wgrad_kernel
    192 bytes stack frame, 184 bytes spill stores, 176 bytes spill loads
ptxas info    : Used 254 registers, used 1 barriers, 184 bytes cumulative stack size, 12 bytes smem
ptxas info    : Compile time = 4087.464 ms
"""
    assert tcc.parse_ptxas_log(log) == {"regs": 254, "spills": 184, "smem": 12}
    with pytest.raises(ValueError, match="one 'Used N registers'"):
        tcc.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")
