"""Per-op timings of the task-batched layer kernels on the CPU: the reference
(fastmaml/layers/torch_kernels.py: one grouped convolution for all tasks, plain PyTorch BatchNorm
blocks), a plain serial per-task loop of ATen convolutions (each using all intra-op threads), and
the C++ kernels (fastmaml/layers/cpp.py: tasks spread over the threads, fused BatchNorm blocks),
at 1 and 2 threads, on the conv4 shapes (T = 32; N = 5 support or 75 query images per task).
For the BatchNorm blocks also ``cpp_base``: the same C++ kernels in their baseline build
(FASTMAML_CPU_ISA=base; ``cpp`` runs the AVX-512 build where the CPU has it).

    python bench/bench_layers.py                 # prints a table, writes bench/results/layers_cpu.json
    python bench/bench_layers.py --repeats 3 --n 5

Before / after a change of csrc/cpu/conv.cpp or csrc/cpu/batchnorm.cpp, in one interleaved run: build
the old source into a library of its own whose ops are registered under another namespace
(``--before-lib``, e.g. with torch.utils.cpp_extension.load after renaming
``TORCH_LIBRARY_FRAGMENT(fastmaml`` and ``TORCH_LIBRARY_IMPL(fastmaml`` to the namespace given by
``--before-ns``): a column ``before``.

Medians of interleaved repeats (the implementations of one row alternate, so that machine noise
hits them alike). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastmaml.layers import cpp as C  # noqa: E402
from fastmaml.layers import torch_kernels as R  # noqa: E402

EPS = 1e-5


def machine() -> dict:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


# conv4 on 28x28 Omniglot: conv inputs 1@28, 64@14, 64@7, 64@3; BatchNorm blocks after each conv
# see 64 channels at 28, 14, 7, 3 (then a 2x2 pool).
CONV_LAYERS = [(1, 28), (64, 14), (64, 7), (64, 3)]
BN_LAYERS = [28, 14, 7, 3]


def serial_conv_forward(x, w, b, stride, padding):
    return torch.stack([F.conv2d(x[t], w[t], b[t], stride=stride, padding=padding) for t in range(x.shape[0])])


def serial_conv_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
    dxs, dws = [], []
    for t in range(x.shape[0]):
        dx, dw, _ = torch.ops.aten.convolution_backward(dy[t], x[t], w[t], None, [stride, stride], [padding, padding],
                                                        [1, 1], False, [0, 0], 1, [need_dx, need_dw, False])
        dxs.append(dx)
        dws.append(dw)
    db = dy.sum(dim=(1, 3, 4)) if need_bias else None
    return (torch.stack(dxs) if need_dx else None), (torch.stack(dws) if need_dw else None), db


def base_isa(fn):
    """``fn`` run with the BatchNorm kernels' baseline build (FASTMAML_CPU_ISA=base)."""
    def run():
        old = os.environ.get("FASTMAML_CPU_ISA")
        os.environ["FASTMAML_CPU_ISA"] = "base"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["FASTMAML_CPU_ISA"]
            else:
                os.environ["FASTMAML_CPU_ISA"] = old
    return run


def rows(T: int, Ns, dtype, before=None):
    """(op, shape, {implementation: fn}); ``before``: the torch.ops namespace of an older build."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    for N in Ns:
        for cin, hw in CONV_LAYERS:
            x, w, b = rnd(T, N, cin, hw, hw), rnd(T, 64, cin, 3, 3) * 0.1, rnd(T, 64)
            dy = rnd(T, N, 64, hw, hw)
            need_dx = cin != 1  # the first layer's input gradient is never needed
            shape = f"N={N} {cin}->64 @{hw}x{hw}"
            yield ("conv fwd", shape, {
                "reference": lambda x=x, w=w, b=b: R.conv2d_forward(x, w, b, 1, 1),
                "serial": lambda x=x, w=w, b=b: serial_conv_forward(x, w, b, 1, 1),
                "cpp": lambda x=x, w=w, b=b: C.conv2d_forward(x, w, b, 1, 1)})
            args = (dy, x, w, 1, 1, need_dx, True, True)
            yield ("conv bwd" + ("" if need_dx else " (no dx)"), shape, {
                "reference": lambda a=args: R.conv2d_backward(*a),
                "serial": lambda a=args: serial_conv_backward(*a),
                "cpp": lambda a=args: C.conv2d_backward(*a)})
        for hw in BN_LAYERS:
            z, rz = rnd(T, N, 64, hw, hw), rnd(T, N, 64, hw, hw)
            gm, bt, ug, ub = 1 + 0.1 * rnd(T, 64), rnd(T, 64), rnd(T, 64), rnd(T, 64)
            out, mean, rstd, idx = R.bn_act_pool_forward(z, gm, bt, EPS, 0.0, 2)
            d, rd = rnd(*out.shape), rnd(*out.shape)
            _, rmean, q = R.bn_act_pool_rforward(rz, z, mean, rstd, gm, bt, ug, ub, idx, 0.0, 2)
            shape = f"N={N} 64 @{hw}x{hw} relu pool2"
            fa = (z, gm, bt, EPS, 0.0, 2)
            ba = (d, z, mean, rstd, gm, bt, idx, 0.0, 2)
            rfa = (rz, z, mean, rstd, gm, bt, ug, ub, idx, 0.0, 2)
            rba = (d, rd, z, rz, mean, rstd, rmean, q, gm, bt, ug, idx, 0.0, 2)
            for name, a in (("bn fwd", fa), ("bn bwd", ba), ("bn rfwd", rfa), ("bn rbwd", rba)):
                fn = {"bn fwd": "bn_act_pool_forward", "bn bwd": "bn_act_pool_backward",
                      "bn rfwd": "bn_act_pool_rforward", "bn rbwd": "bn_act_pool_rbackward"}[name]
                impls = {"reference": lambda a=a, f=getattr(R, fn): f(*a),
                         "cpp": lambda a=a, f=getattr(C, fn): f(*a),
                         "cpp_base": base_isa(lambda a=a, f=getattr(C, fn): f(*a))}
                if before is not None:
                    impls["before"] = lambda a=a, f=getattr(before, fn): f(*a)
                yield (name, shape, impls)


def time_row(impls, repeats: int):
    for fn in impls.values():  # warm-up (primitive creation, allocator)
        fn()
    times = {k: [] for k in impls}
    for _ in range(repeats):
        for k, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--n", type=int, nargs="+", default=[5, 75])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "layers_cpu.json"))
    ap.add_argument("--before-lib", default=None, help="an older build of the layer kernels (csrc/cpu/; see above)")
    ap.add_argument("--before-ns", default="fmbase", help="the torch.ops namespace of --before-lib")
    args = ap.parse_args(argv)
    if not C.AVAILABLE:
        print(f"C++ layer kernels unavailable: {C.REASON}")
        return 1
    before = None
    if args.before_lib:
        torch.ops.load_library(args.before_lib)
        before = getattr(torch.ops, args.before_ns)
    dtype = getattr(torch, args.dtype)
    old_threads = torch.get_num_threads()
    results = []
    isa = torch.ops.fastmaml.bn_kernels_isa() if hasattr(torch.ops.fastmaml, "bn_kernels_isa") else "?"
    hdr = (f"{'op':<17} {'shape':<28} {'thr':>3} {'reference':>10} {'serial':>9} {'cpp':>9} {'ref/cpp':>8} "
           f"{'ser/cpp':>8} {'cpp_base':>9} {'base/cpp':>8}" + (f" {'before':>9} {'bef/cpp':>8}" if before else ""))
    print(f"torch {torch.__version__}, {machine()['cpu']}, T={args.tasks}, {args.dtype}, "
          f"median of {args.repeats} (ms); BatchNorm kernels: {isa} build")
    print(hdr)
    print("-" * len(hdr))
    with torch.no_grad():
        for op, shape, impls in rows(args.tasks, args.n, dtype, before):
            for thr in args.threads:
                torch.set_num_threads(thr)
                ms = time_row(impls, args.repeats)
                row = {"op": op, "shape": shape, "threads": thr, "ms": ms,
                       "reference_over_cpp": ms["reference"] / ms["cpp"]}
                for k in ("serial", "cpp_base", "before"):
                    if k in ms:
                        row[f"{k}_over_cpp"] = ms[k] / ms["cpp"]
                results.append(row)

                def col(k):
                    return ((f"{ms[k]:9.3f}", f"{row[k + '_over_cpp']:7.2f}x") if k in ms
                            else (f"{'-':>9}", f"{'-':>8}"))
                (ser, sr), (bs, br), (bf, bfr) = col("serial"), col("cpp_base"), col("before")
                print(f"{op:<17} {shape:<28} {thr:>3} {ms['reference']:10.3f} {ser} {ms['cpp']:9.3f} "
                      f"{row['reference_over_cpp']:7.2f}x {sr} {bs} {br}" + (f" {bf} {bfr}" if before else ""),
                      flush=True)
    torch.set_num_threads(old_threads)
    totals = {}
    for r in results:
        for group in ("all", "bn" if r["op"].startswith("bn") else "conv"):
            key = (r["threads"], r["shape"].split()[0], group)
            t = totals.setdefault(key, {})
            for k, v in r["ms"].items():
                t[k] = t.get(k, 0.0) + v
    print("\nsum over ops (ms):")
    for (thr, n, group), t in sorted(totals.items()):
        others = ", ".join(f"{k} {v:.2f} ({v / t['cpp']:.2f}x)" for k, v in t.items() if k != "cpp")
        print(f"  threads={thr} {n} {group}: cpp {t['cpp']:.2f}; {others}")
    doc = {"machine": machine(), "torch": torch.__version__, "parallel_backend_info":
           torch.__config__.parallel_info().splitlines()[:6], "dtype": args.dtype, "tasks": args.tasks,
           "repeats": args.repeats, "threads": args.threads, "unit": "ms (median)",
           "load_average": os.getloadavg(), "bn_kernels_isa": isa, "before_lib": args.before_lib, "rows": results,
           "totals": [{"threads": k[0], "n": k[1], "ops": k[2], **v} for k, v in sorted(totals.items())]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
