"""bench/cuda_compile_check.py's rules and log reader, on known numbers (no nvcc needed). The compile
itself runs in .ci/run (nvcc from NVIDIA's pip wheels) and in tests/test_cuda_compile.py (nvcc on PATH)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import cuda_compile_check as ccc  # noqa: E402

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fastmaml4cuda12scale_kernelIfLi0EEEvPT_' for 'sm_90a'
ptxas info    : Function properties for _ZN8fastmaml4cuda12scale_kernelIfLi0EEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 416 bytes cmem[0]
ptxas info    : Compile time = 20.643 ms
ptxas info    : Compiling entry function '_ZN8fastmaml4cuda18segment_dot_kernelIdLi1EEEvPT_' for 'sm_80'
ptxas info    : Function properties for _ZN8fastmaml4cuda18segment_dot_kernelIdLi1EEEvPT_
    24 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 40 bytes smem, 416 bytes cmem[0]
"""


def test_ptxas_log_reader():
    got = ccc.parse_ptxas_log(LOG)
    assert [(e["target"], e["regs"], e["spills"], e["smem"]) for e in got] == [("sm_90", 26, 0, 0),
                                                                               ("sm_80", 255, 16, 40)]
    with pytest.raises(ValueError, match="cannot read"):
        ccc.parse_ptxas_log("ptxas info    : Compiling entry function 'k' for 'sm_80'\n")


def test_launch_rules():
    assert ccc.launch_problems(256, 255, 48 * 1024, 0, None) == []  # 8 warps x 8,192 = 65,536 registers
    assert any("registers per block" in p for p in ccc.launch_problems(512, 255, 0, 0, None))
    assert any("threads" in p for p in ccc.launch_problems(2048, 16, 0, 0, None))
    assert any("shared memory" in p for p in ccc.launch_problems(256, 32, 48 * 1024 + 1, 0, None))
    assert ccc.launch_problems(256, 32, 0, 64, None) == []
    assert any("spills" in p for p in ccc.launch_problems(256, 32, 0, 64, 0))


def test_block_size_of_the_kernels_and_a_foreign_launch():
    src = (ROOT / "csrc" / "cuda" / "fused_ops.cu").read_text()
    assert ccc.block_size(src, "fused_ops.cu") == 256
    with pytest.raises(ValueError, match="not kThreads"):
        ccc.block_size(src + "\nvoid f() { k<<<grid, 512, 0, s>>>(x); }\n", "fused_ops.cu")
    with pytest.raises(ValueError, match="kThreads"):
        ccc.block_size(src.replace("constexpr int kThreads = 256;", ""), "fused_ops.cu")
