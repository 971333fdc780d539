"""Compile check of the plain-CUDA device code in csrc/cuda/*.cu with nvcc (no GPU, no torch needed).

Skipped when nvcc is not on PATH. Each file is compiled for sm_80 and sm_90 with -std=c++17, and
once more the way a CUDA build of torch compiles it from setup.py (C++20 and torch's
__CUDA_NO_HALF*__ macros, which forbid implicit half/bfloat16 conversions).
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

TORCH_LIKE_FLAGS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

CONFIGS = {
    "sm_80": ["-std=c++17", "-arch=sm_80"],
    "sm_90": ["-std=c++17", "-arch=sm_90"],
    "sm_90-torch-flags": TORCH_LIKE_FLAGS + ["-arch=sm_90"],
}


def test_there_are_cu_files():
    assert CU_FILES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(cu, config, tmp_path):
    out = tmp_path / (cu.stem + ".o")
    cmd = [NVCC, *CONFIGS[config], "-c", "-o", str(out), str(cu)]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=900)
    assert r.returncode == 0, (
        f"nvcc failed ({r.returncode}) for {cu.name} [{config}]\n$ {' '.join(cmd)}\n"
        f"--- stderr ---\n{r.stderr}\n--- stdout ---\n{r.stdout}"
    )
    assert out.exists() and out.stat().st_size > 0
