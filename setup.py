"""Build script for fastmaml and its optional compiled extension ``fastmaml._C``.

Install (torch must already be installed: it is deliberately NOT an install requirement, because it
must be pinned by the user or CI to the local torch wheel, here 2.13.0):

    pip install --no-build-isolation -e .

What gets built:

* a CPU build of torch (``torch.version.cuda is None``), or CUDA torch without a CUDA toolkit:
  ``CppExtension`` from ``csrc/module.cpp`` (the Python module) and ``csrc/cpu/*.cpp`` (one file per
  op family, each registering its schemas and CPU kernels: flat ops, convolution, the BatchNorm
  block, CG);
* a CUDA build of torch with ``CUDA_HOME`` found: ``CUDAExtension`` from those and ``csrc/cuda/``
  (``cuda_ops.cpp``, ``fused_ops.cu``) with ``-DFASTMAML_WITH_CUDA``; the target
  architectures follow ``TORCH_CUDA_ARCH_LIST`` (torch's own handling).

Environment variables:

* ``FASTMAML_NO_EXT=1``: build no extension (pure Python; the ops fall back to the reference).
* ``FASTMAML_REQUIRE_EXT=1``: a missing torch or a failed compile is an error (CI sets this).
  Without it, such a failure prints a loud warning and installs the pure-Python package.

The C++ standard is torch's default for extensions (C++20 for torch >= 2.10, whose headers need
it); the sources themselves only use C++17.
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import traceback

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


NO_EXT = _flag("FASTMAML_NO_EXT")
REQUIRE_EXT = _flag("FASTMAML_REQUIRE_EXT")


def _loud_warning(msg: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n!! fastmaml WARNING\n{textwrap.indent(msg.strip(), '!! ')}\n{bar}\n\n")
    sys.stderr.flush()


def _openmp_flags(torch_module):
    """``-fopenmp`` (compile and link) when torch's intra-op backend is OpenMP and the compiler
    accepts it: ``at::parallel_for`` is inline and runs serially in code compiled without it."""
    info = torch_module.__config__.parallel_info()
    backend = ""
    for line in info.splitlines():
        if "parallel backend" in line:
            backend = line.split(":", 1)[-1].strip()
    if "OpenMP" not in backend:
        return []
    cxx = os.environ.get("CXX", "c++")
    src = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\nreturn n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp_check.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cxx, "-fopenmp", path, "-o", os.path.join(tmp, "omp_check")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            ok = r.returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        _loud_warning(f"torch uses OpenMP but '{cxx} -fopenmp' does not work: the CPU kernels of "
                      "fastmaml._C will run single-threaded.")
        return []
    return ["-fopenmp"]


def _progress_stream():
    """Where build progress goes: the terminal when there is one (pip captures the build's stdout and
    stderr and shows them only with ``-v``), else stderr."""
    try:
        return open("/dev/tty", "w", buffering=1)
    except OSError:
        return sys.stderr


def _show_ninja_progress(cpp_extension) -> None:
    """Replace torch's ``ninja -v`` runner with one that prints a line as each unit finishes
    (``[2/3] csrc/cpu/batchnorm.cpp compiled (79 s elapsed)``; ninja reports a unit when it ends when its
    output is a pipe) and keeps the full compiler output in
    ``build/fastmaml-build.log`` (shown in full on a failure). A torch without the private hook builds
    as before, without the progress lines."""
    if not hasattr(cpp_extension, "_run_ninja_build"):
        return
    import time

    def run_ninja_build(build_directory: str, verbose: bool, error_prefix: str) -> None:
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        out = _progress_stream()
        log_path = os.path.join(ROOT, "build", "fastmaml-build.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        start = time.monotonic()
        out.write(f"fastmaml: compiling the C++ extension with {jobs} parallel jobs "
                  f"(full log: {os.path.relpath(log_path, ROOT)})\n")
        lines = []
        with open(log_path, "w") as log:
            proc = subprocess.Popen(["ninja", "-v", "-j", jobs], cwd=build_directory,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                step = re.match(r"\[(\d+)/(\d+)\]\s+(.*)", line)
                if step:
                    k, n, cmd = step.groups()
                    what = re.search(r"(?:-c|--compile)\s+(\S+\.(?:cpp|cu))", cmd)
                    name = os.path.relpath(what.group(1), ROOT) if what else "a build step"
                    out.write(f"fastmaml: [{k}/{n}] {name} compiled ({time.monotonic() - start:.0f} s elapsed)\n")
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{error_prefix}: {''.join(lines)}")
        out.write(f"fastmaml: the C++ extension compiled in {time.monotonic() - start:.0f} s\n")

    cpp_extension._run_ninja_build = run_ninja_build


def _extensions():
    """([extension], cmdclass), or ([], {}) for a pure-Python build."""
    if NO_EXT:
        print("fastmaml: FASTMAML_NO_EXT=1, building no extension (pure Python)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if REQUIRE_EXT:
            raise RuntimeError("fastmaml: FASTMAML_REQUIRE_EXT=1 but torch is not importable at build "
                               f"time ({e}); install torch first and use --no-build-isolation") from e
        _loud_warning(f"torch is not importable at build time ({e}).\n"
                      "Installing fastmaml WITHOUT its compiled extension (pure Python).\n"
                      "Install torch first, then: pip install --no-build-isolation -e .")
        return [], {}

    # FASTMAML_OPENMP=0 builds without OpenMP (at::parallel_for then runs serially in our kernels).
    omp = [] if os.environ.get("FASTMAML_OPENMP", "1") == "0" else _openmp_flags(torch)
    cxx_flags = ["-O3"] + omp
    link_flags = list(omp)
    # One unit per op family (csrc/cpu/); the Python module init on its own.
    sources = ["csrc/module.cpp", "csrc/cpu/flat_checks.cpp", "csrc/cpu/flat_ops.cpp",
               "csrc/cpu/conv.cpp", "csrc/cpu/batchnorm.cpp", "csrc/cpu/cg.cpp"]
    include_dirs = [ROOT]

    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        _loud_warning(f"torch is a CUDA build ({torch.version.cuda}) but no CUDA toolkit was found "
                      "(set CUDA_HOME): building the CPU kernels only.")
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            name="fastmaml._C",
            sources=sources + ["csrc/cuda/cuda_ops.cpp", "csrc/cuda/fused_ops.cu"],
            include_dirs=include_dirs,
            define_macros=[("FASTMAML_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="fastmaml._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"fastmaml: building fastmaml._C ({'CPU + CUDA' if use_cuda else 'CPU'}) against torch "
          f"{torch.__version__}")

    if cpp_extension.is_ninja_available():
        _show_ninja_progress(cpp_extension)
    else:
        _progress_stream().write(
            "fastmaml: ninja is not installed, so the C++ extension's units compile one after the other "
            "without progress lines (pip install ninja: parallel, with a line per unit)\n")
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtensionOrWarn(base):
        """torch's BuildExtension; a compile failure installs pure Python unless REQUIRE_EXT."""

        def run(self):
            try:
                super().run()
            except Exception:  # noqa: BLE001  (any compiler/ninja failure)
                if REQUIRE_EXT:
                    raise
                _loud_warning("building the C++ extension fastmaml._C FAILED; installing the pure-Python "
                              "package (the reference kernels will be used).\n"
                              "Set FASTMAML_REQUIRE_EXT=1 to make this an error. The failure:\n"
                              + traceback.format_exc(limit=3))
                self.extensions = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            if not self.extensions:
                return {}
            return super().get_output_mapping()

    return [ext], {"build_ext": BuildExtensionOrWarn}


ext_modules, cmdclass = _extensions()

packages = find_packages(include=["fastmaml*"])
package_data = {}
# fastmaml/data/splits/**/*.txt (data-only folders, no __init__.py): each folder holding .txt files is
# listed as a package of its own, so that setuptools ships the files without a warning.
_splits = os.path.join(ROOT, "fastmaml", "data", "splits")
if os.path.isdir(_splits):
    for _dir, _, _files in sorted(os.walk(_splits)):
        if any(f.endswith(".txt") for f in _files):
            _pkg = os.path.relpath(_dir, ROOT).replace(os.sep, ".")
            if _pkg not in packages:
                packages.append(_pkg)
            package_data[_pkg] = ["*.txt"]

setup(
    # name, version, description and requires-python live in pyproject.toml
    packages=packages,
    package_data=package_data,
    include_package_data=True,
    # torch is deliberately absent: pin it yourself (CI: the local torch 2.13.0 wheel) and install
    # with --no-build-isolation so that the extension builds against that very torch.
    install_requires=["numpy", "pillow", "matplotlib"],
    entry_points={"console_scripts": ["fastmaml=fastmaml.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
