"""Compile csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no GPU needed) and check that every kernel can launch.

    python bench/cuda_compile_check.py                         # nvcc from PATH
    python bench/cuda_compile_check.py --nvcc /path/to/nvcc --json out.json

Each file is compiled once for both targets (``-gencode`` per target, ``-Xptxas -v``), the way it is
written (``-std=c++17``) and the way a CUDA build of torch compiles it from setup.py (``-std=c++20`` and
torch's ``__CUDA_NO_HALF*__`` macros, which forbid implicit half / bfloat16 conversions). ptxas' log
gives, per kernel and target, registers, spill stores and static shared memory. A kernel fails when
  threads   its block size (``kThreads`` of the file: every ``<<<...>>>`` launch must use it) > 1,024
  regs      regs > 255, or block size x regs (allocated per warp in units of 256) > 65,536
  shared    static shared memory > 48 KB (the launches ask for no dynamic shared memory)
and the file fails on any nvcc error. Spills are reported (``--max-spills`` to fail on them).

nvcc without a CUDA install: .ci/run installs NVIDIA's pip wheels (nvidia-cuda-nvcc, whose
dependencies bring cicc / libnvvm, the runtime headers and crt, plus nvidia-cuda-cccl for
<nv/target>) into a temporary folder and passes ``--nvcc``; the host compiler is the system's g++.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")
MAX_THREADS = 1024
REGS_PER_BLOCK = 65536
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256  # registers are given to a warp in units of 256
MAX_STATIC_SHARED = 48 * 1024  # static __shared__ per block, on every architecture

FLAGS = {
    "c++17": ["-std=c++17"],
    "torch": ["-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"],
}


@dataclass
class KernelUsage:
    """One kernel of one file, compiled for one target with one flag set."""

    file: str
    flags: str
    target: str
    kernel: str  # demangled, shortened
    regs: int
    spills: int  # bytes of spill stores
    shared: int  # bytes of static shared memory
    ok: bool
    why: str


def block_size(source: str, path: str) -> int:
    """The block size of every launch in ``source``: ``constexpr int kThreads = N`` and every ``<<<grid,
    block, ...>>>`` launch passing ``kThreads`` as ``block``. Raises if a launch uses another block size,
    so that a new launch shape is checked deliberately."""
    m = re.search(r"constexpr\s+int\s+kThreads\s*=\s*(\d+)\s*;", source)
    if m is None:
        raise ValueError(f"{path}: no 'constexpr int kThreads = N;' (the block size this check assumes)")
    launches = re.findall(r"<<<([^>]*)>>>", source)
    if not launches:
        raise ValueError(f"{path}: no kernel launch (<<<...>>>) found")
    others = [l for l in launches if [a.strip() for a in l.split(",")][1:2] != ["kThreads"]]
    if others:
        raise ValueError(f"{path}: launches whose block size is not kThreads: {others}; extend "
                         f"bench/cuda_compile_check.py to know their block size")
    return int(m.group(1))


def parse_ptxas_log(log: str) -> List[Dict[str, object]]:
    """Per compiled entry function of a ``ptxas -v`` log: mangled name, target, regs, spills, smem."""
    out: List[Dict[str, object]] = []
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function )", log)[1:]:
        head = re.match(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'", block)
        used = re.search(r"Used (\d+) registers", block)
        if head is None or used is None:
            raise ValueError(f"cannot read this ptxas -v block:\n{block}")
        spill = re.search(r"(\d+) bytes spill stores", block)
        smem = re.search(r"(\d+) bytes smem", block)
        out.append({"name": head.group(1), "target": head.group(2).rstrip("a"), "regs": int(used.group(1)),
                    "spills": int(spill.group(1)) if spill else 0, "smem": int(smem.group(1)) if smem else 0})
    return out


def launch_problems(threads: int, regs: int, shared: int, spills: int, max_spills: Optional[int]) -> List[str]:
    """Why a kernel with these resources cannot launch (empty: it can)."""
    warps = -(-threads // 32)
    block_regs = warps * -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    problems = []
    if threads > MAX_THREADS:
        problems.append(f"{threads} threads > {MAX_THREADS}")
    if regs > MAX_REGS_PER_THREAD:
        problems.append(f"{regs} registers per thread > {MAX_REGS_PER_THREAD}")
    if block_regs > REGS_PER_BLOCK:
        problems.append(f"{block_regs} registers per block ({threads} threads x {regs}) > {REGS_PER_BLOCK}")
    if shared > MAX_STATIC_SHARED:
        problems.append(f"{shared} bytes of static shared memory > {MAX_STATIC_SHARED}")
    if max_spills is not None and spills > max_spills:
        problems.append(f"{spills} bytes of register spills > --max-spills {max_spills}")
    return problems


def _demangle(names: Sequence[str]) -> Dict[str, str]:
    """Readable kernel names (c++filt when present; the mangled name otherwise, for display only)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), stdout=subprocess.PIPE, text=True, check=True)
    short = [re.sub(r"^void |\(anonymous namespace\)::|fastmaml::cuda::", "", d).split("(")[0]
             for d in r.stdout.splitlines()]
    return dict(zip(names, short))


def compile_file(nvcc: str, path: str, flags: str, max_spills: Optional[int], workdir: str):
    """(usages, error): the kernels of ``path`` compiled for ARCHS with the flag set ``flags``."""
    threads = block_size(open(path).read(), path)
    gencode = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]
    cmd = [nvcc, *FLAGS[flags], *gencode, "-Xptxas", "-v", "-c", path,
           "-o", os.path.join(workdir, f"{os.path.basename(path)}.{flags}.o")]
    r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if r.returncode != 0:  # the error lines, not ptxas' -v noise around them
        errors = [ln for ln in r.stdout.splitlines() if re.search(r"error|fatal", ln, re.IGNORECASE)]
        return [], f"nvcc exited {r.returncode}\n$ {' '.join(cmd)}\n" + "\n".join(errors[:20] or r.stdout.splitlines()[-20:])
    entries = parse_ptxas_log(r.stdout)
    names = _demangle(sorted({str(e["name"]) for e in entries}))
    usages = []
    for e in entries:
        why = launch_problems(threads, int(e["regs"]), int(e["smem"]), int(e["spills"]), max_spills)
        usages.append(KernelUsage(os.path.relpath(path, REPO), flags, str(e["target"]), names[str(e["name"])],
                                  int(e["regs"]), int(e["spills"]), int(e["smem"]), not why, "; ".join(why)))
    missing = set(ARCHS) - {u.target for u in usages}
    if missing:
        return usages, f"ptxas compiled no kernel for {sorted(missing)} (is there a __global__ function?)"
    return usages, ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nvcc", default=shutil.which("nvcc"), help="the nvcc to use (default: nvcc on PATH)")
    ap.add_argument("--files", nargs="+", default=None, help="the .cu files (default: csrc/cuda/*.cu)")
    ap.add_argument("--flags", nargs="+", default=list(FLAGS), choices=list(FLAGS), help="flag sets (default: all)")
    ap.add_argument("--max-spills", type=int, default=None, help="fail a kernel spilling more bytes than this")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if not args.nvcc or not os.access(args.nvcc, os.X_OK):
        ap.error(f"--nvcc must be an executable nvcc; got {args.nvcc!r} (none on PATH?)")
    cuda_dir = os.path.join(REPO, "csrc", "cuda")
    files = args.files or sorted(os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir) if f.endswith(".cu"))
    if not files:
        ap.error("no .cu files to compile")

    start = time.perf_counter()
    version = subprocess.run([args.nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    usages: List[KernelUsage] = []
    errors: List[str] = []
    with tempfile.TemporaryDirectory(prefix="cuda-compile-check-") as work:
        for path in files:
            for flags in args.flags:
                got, error = compile_file(args.nvcc, path, flags, args.max_spills, work)
                usages += got
                if error:
                    errors.append(f"{os.path.relpath(path, REPO)} [{flags}]: {error}")
    head = ("file", "flags", "target", "kernel", "regs", "spills", "shared", "ok")
    rows = [(u.file, u.flags, u.target, u.kernel, str(u.regs), str(u.spills), str(u.shared),
             "ok" if u.ok else "FAIL") for u in usages]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    for row in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    bad = [u for u in usages if not u.ok]
    for u in bad:
        print(f"FAIL {u.file} [{u.flags}] {u.target} {u.kernel}: {u.why}")
    for e in errors:
        print(f"FAIL {e}")
    elapsed = time.perf_counter() - start
    print(f"nvcc compile check ({version[-1] if version else '?'}): {len(files)} file(s) x {len(args.flags)} flag "
          f"set(s) x {len(ARCHS)} targets, {len(usages)} kernels, {len(bad)} over budget, {len(errors)} errors; "
          f"{elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nvcc": version, "seconds": elapsed, "errors": errors,
                       "kernels": [asdict(u) for u in usages]}, f, indent=1)
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
