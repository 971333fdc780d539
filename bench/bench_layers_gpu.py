"""Triton layer kernels (fastmaml/triton/layers/) against the PyTorch reference (fastmaml/layers/torch_kernels.py)
on a CUDA device, at the conv4 shapes of the standard workload.

Shapes: T tasks (32), N images per task (5: the support set of 5-way 1-shot; 75: its 15-query set),
C = 64 channels, the four blocks' pre-BatchNorm sides 28, 14, 7, 3 (BatchNorm + ReLU + 2x2 max-pool);
the first layer's one-input-channel 3x3 convolution on 28 x 28 inputs (forward, weight gradient).
For each op: the median time of the reference and of the Triton kernel (CUDA-synchronised wall time,
medians of --repeats runs, each run repeated until it lasts --min-time), the speedup, and the Triton
result's relative error against the reference (whole output, every output of the op) as a check that
the compiled kernels agree on the device. Prints a table and writes JSON with the machine's details
to $OUT (when set), --out, or bench/results.

Device only: without a CUDA device (or without triton) it prints why and exits with status 0.

usage: python bench/bench_layers_gpu.py [--tasks 32] [--shots 5,75] [--sides 28,14,7,3] [--pools 2]
                                         [--slope 0] [--dtype float32] [--repeats 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import device_tag, machine, median_time, table, write_json  # noqa: E402


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _rel(got, want) -> float:
    """Largest relative error (whole tensor) over the op's outputs (None pairs skipped)."""
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            continue
        if g.dtype == torch.uint8:
            worst = max(worst, float((g != w).float().mean().item()))  # fraction of differing indices
            continue
        g, w = g.double(), w.double()
        den = w.norm().item()
        num = (g - w).norm().item()
        worst = max(worst, num / den if den else num)
    return worst


def _row(op: str, N: int, side: int, pool: int, ref_fn: Callable, tri_fn: Callable, dev: str, repeats: int,
         min_time: float) -> Dict[str, object]:
    err = _rel(tri_fn(), ref_fn())
    t_ref = median_time(ref_fn, dev, repeats=repeats, warmup=2, min_time=min_time)
    t_tri = median_time(tri_fn, dev, repeats=repeats, warmup=2, min_time=min_time)
    return {
        "op": op, "N": N, "side": side, "pool": pool,
        "ref_ms": t_ref["median_s"] * 1e3, "triton_ms": t_tri["median_s"] * 1e3,
        "speedup": t_ref["median_s"] / t_tri["median_s"], "rel_err": err,
        "ref": t_ref, "triton": t_tri,
    }


def bench_bn(R, L, T: int, N: int, C: int, side: int, pool: int, slope: float, dtype, dev: str, repeats: int,
             min_time: float) -> List[Dict[str, object]]:
    g = torch.Generator(device=dev).manual_seed(1000 * N + side)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    z = rnd(T, N, C, side, side) * 2 + rnd(T, 1, C, 1, 1)
    gamma, beta = rnd(T, C), rnd(T, C)
    ug, ub = rnd(T, C), rnd(T, C)
    rz = rnd(T, N, C, side, side)
    eps = 1e-5
    out, mean, rstd, idx = R.bn_act_pool_forward(z, gamma, beta, eps, slope, pool)
    dout, rdout = torch.randn_like(out), torch.randn_like(out)
    _, rmean, q = R.bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ug, ub, idx, slope, pool)
    rows = [
        _row("bn_act_pool_forward", N, side, pool,
             lambda: R.bn_act_pool_forward(z, gamma, beta, eps, slope, pool),
             lambda: L.bn_act_pool_forward(z, gamma, beta, eps, slope, pool), dev, repeats, min_time),
        _row("bn_act_pool_backward", N, side, pool,
             lambda: R.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool),
             lambda: L.bn_act_pool_backward(dout, z, mean, rstd, gamma, beta, idx, slope, pool), dev, repeats,
             min_time),
        _row("bn_act_pool_rforward", N, side, pool,
             lambda: R.bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ug, ub, idx, slope, pool),
             lambda: L.bn_act_pool_rforward(rz, z, mean, rstd, gamma, beta, ug, ub, idx, slope, pool), dev, repeats,
             min_time),
        _row("bn_act_pool_rbackward", N, side, pool,
             lambda: R.bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ug, idx, slope,
                                             pool),
             lambda: L.bn_act_pool_rbackward(dout, rdout, z, rz, mean, rstd, rmean, q, gamma, beta, ug, idx, slope,
                                             pool), dev, repeats, min_time),
    ]
    return rows


def bench_conv(R, L, T: int, N: int, C: int, side: int, dtype, dev: str, repeats: int,
               min_time: float) -> List[Dict[str, object]]:
    g = torch.Generator(device=dev).manual_seed(7 * N + side)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    x = rnd(T, N, 1, side, side)
    w, b = rnd(T, C, 1, 3, 3), rnd(T, C)
    rows = []
    for stride in (1,):
        y = R.conv2d_forward(x, w, b, stride, 1)
        dy = torch.randn_like(y)
        rows.append(_row(f"conv2d_cin1_forward(s{stride})", N, side, 0,
                         lambda: R.conv2d_forward(x, w, b, stride, 1),
                         lambda: L.conv2d_cin1_forward(x, w, b, stride, 1), dev, repeats, min_time))
        rows.append(_row(f"conv2d_cin1_weight_grad(s{stride})", N, side, 0,
                         lambda: R.conv2d_backward(dy, x, w, stride, 1, False, True, False)[1],
                         lambda: L.conv2d_cin1_weight_grad(dy, x, stride, 1), dev, repeats, min_time))
    return rows


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--shots", default="5,75", help="images per task, comma-separated")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--sides", default="28,14,7,3", help="pre-BatchNorm sides, comma-separated")
    ap.add_argument("--conv-side", type=int, default=28, help="input side of the one-channel convolution")
    ap.add_argument("--pools", default="2", help="pool settings to time (0 and/or 2)")
    ap.add_argument("--slope", type=float, default=0.0, help="0: ReLU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds each timed run lasts at least")
    ap.add_argument("--out", default=None, help="folder for the JSON (default $OUT, else bench/results)")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="run this script on the CPU under TRITON_INTERPRET=1 (a check of the script only: tiny "
                         "shapes, meaningless times, no JSON written)")
    args = ap.parse_args(list(argv) or None)

    if args.smoke_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tasks, args.shots, args.channels, args.sides, args.conv_side = 2, "3", 4, "7,3", 9
        args.repeats, args.min_time, args.pools = 1, 0.0, "0,2"
    elif not torch.cuda.is_available():
        print("bench_layers_gpu: no CUDA device here; this benchmark only runs on a GPU. Nothing timed.")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.smoke_cpu:
        print("bench_layers_gpu: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels. Nothing timed.")
        return 0
    try:
        from fastmaml.triton import layers as L
    except ImportError as exc:
        print(f"bench_layers_gpu: the Triton kernels cannot be imported ({exc}). Nothing timed.")
        return 0
    from fastmaml.layers import torch_kernels as R

    dev = "cpu" if args.smoke_cpu else "cuda"
    dtype, T, C = getattr(torch, args.dtype), args.tasks, args.channels
    rows: List[Dict[str, object]] = []
    for N in _ints(args.shots):
        rows += bench_conv(R, L, T, N, C, args.conv_side, dtype, dev, args.repeats, args.min_time)
        for pool in _ints(args.pools):
            for side in _ints(args.sides):
                rows += bench_bn(R, L, T, N, C, side, pool, args.slope, dtype, dev, args.repeats, args.min_time)
    cols = ["op", "N", "side", "pool", "ref_ms", "triton_ms", "speedup", "rel_err"]
    name = "CPU (Triton interpreter, smoke test)" if args.smoke_cpu else torch.cuda.get_device_name()
    print(f"T = {T}, C = {C}, {args.dtype}, slope {args.slope}; {name}")
    print(table(rows, cols))
    ref_total = sum(r["ref_ms"] for r in rows)
    tri_total = sum(r["triton_ms"] for r in rows)
    print(f"total: reference {ref_total:.3f} ms, triton {tri_total:.3f} ms ({ref_total / tri_total:.2f}x)")
    payload = {
        "benchmark": "layers_gpu",
        "machine": machine(dev),
        "config": {"tasks": T, "shots": _ints(args.shots), "channels": C, "sides": _ints(args.sides),
                   "conv_side": args.conv_side, "pools": _ints(args.pools), "slope": args.slope,
                   "dtype": args.dtype, "repeats": args.repeats, "min_time": args.min_time},
        "rows": rows,
        "total_ms": {"reference": ref_total, "triton": tri_total},
    }
    if args.smoke_cpu:
        bad = [r for r in rows if r["rel_err"] > 1e-5]
        print("smoke test:", "FAILED " + str([r["op"] for r in bad]) if bad else "ok (no JSON written)")
        return 1 if bad else 0
    out_dir = args.out or os.environ.get("OUT") or None
    path = write_json(f"layers_gpu_{device_tag(dev)}", payload, out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
