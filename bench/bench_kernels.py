"""Time per fused op for each kernel backend, against the reference and ``torch._foreach_*``.

Workload: the fast weights of the paper's Omniglot network (4 x conv 64 + BatchNorm + linear, all
P = 112,261 parameters in 18 tensors adapted) for T = 32 tasks.
``foreach`` is the per-tensor alternative: the same update written with ``torch._foreach_*`` over
the per-layer [T, *shape] tensors (one launch per op per tensor instead of one fused pass).

usage: python bench/bench_kernels.py [--device cpu|cuda] [--tasks 32] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_tag, machine, median_time, table, write_json  # noqa: E402

import fastmaml.kernels as K  # noqa: E402
from fastmaml.layout import FlatLayout  # noqa: E402
from fastmaml.models import conv4  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    ap.add_argument("--triton-cpu", action="store_true",
                    help="also time Triton on the CPU (its interpreter: correctness only, very slow)")
    args = ap.parse_args()
    dev, dtype, T = args.device, getattr(torch, args.dtype), args.tasks
    if args.threads:
        torch.set_num_threads(args.threads)

    model = conv4(5)
    names = [n for n, _ in model.named_parameters()]
    layout = FlatLayout.of(model, names)
    P, S = layout.numel, layout.num_segments
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    theta, grad, v, hv, gq = rnd(P), rnd(T, P), rnd(T, P), rnd(T, P), rnd(T, P)
    seg = layout.segments(torch.device(dev))
    lrs = {"scalar": (torch.tensor(0.4).to(dev, dtype), None),
           "segment": ((torch.rand(S, generator=g) + 0.1).to(dev, dtype), seg),
           "element": ((torch.rand(P, generator=g) + 0.1).to(dev, dtype), None)}

    # Per-tensor views for the foreach baseline: [T, *shape] per parameter tensor.
    theta_l = [t.expand(T, *t.shape).contiguous() for t in layout.views(theta).values()]
    grad_l, v_l, hv_l, gq_l = (list(layout.views(x).values()) for x in (grad, v, hv, gq))
    seg_scalars = [float(x) for x in lrs["segment"][0]]

    backends = []
    for name, status in K.available_backends().items():
        if status != "available":
            continue
        if name == "cpp" and dev != "cpu" or name == "cuda" and dev == "cpu":
            continue
        if name == "triton" and dev == "cpu" and not args.triton_cpu:
            continue
        backends.append(name)

    rows = []

    def record(op, form, impl, fn):
        r = median_time(fn, dev, repeats=args.repeats, warmup=2, min_time=0.05)
        rows.append(dict(op=op, lr=form, impl=impl, ms=r["median_s"] * 1e3, **{k: v for k, v in r.items() if k != "median_s"}))

    for form, (lr, sg) in lrs.items():
        for b in backends:
            ops = K.implementation(b)
            record("inner_update", form, b, lambda: ops.inner_update(theta, grad, lr, sg))
            record("scale", form, b, lambda: ops.scale(v, lr, sg))
            record("segment_dot", form, b, lambda: ops.segment_dot(v, grad, lr, sg))
            record("reverse_step", form, b, lambda: ops.reverse_step(v, hv, grad, gq, 0.5, lr, sg))
        # foreach: scalar and per-segment rates are one number per tensor.
        if form != "element":
            alphas = [float(lr)] * len(theta_l) if form == "scalar" else seg_scalars
            record("inner_update", form, "foreach",
                   lambda: torch._foreach_sub(theta_l, torch._foreach_mul(grad_l, alphas)))
            record("scale", form, "foreach", lambda: torch._foreach_mul(v_l, alphas))
            record("segment_dot", form, "foreach",
                   lambda: torch.stack([x.sum() for x in torch._foreach_mul(v_l, grad_l)]))

            def foreach_reverse():
                out = torch._foreach_sub(v_l, hv_l)
                torch._foreach_add_(out, gq_l, alpha=0.5)
                return out, torch.stack([x.sum() for x in torch._foreach_mul(v_l, grad_l)])

            record("reverse_step", form, "foreach", foreach_reverse)

    ref_ms = {(r["op"], r["lr"]): r["ms"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        r["speedup_vs_torch"] = ref_ms[(r["op"], r["lr"])] / r["ms"]
    print(f"fused ops, T={T}, P={P}, {args.dtype}, device={dev} ({machine(dev)['device_name']}), "
          f"threads={torch.get_num_threads()}")
    print(table(rows, ["op", "lr", "impl", "ms", "speedup_vs_torch"]))
    path = write_json(f"kernels_{device_tag(dev)}", {
        "machine": machine(dev), "tasks": T, "P": P, "segments": S, "dtype": args.dtype, "rows": rows,
    }, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
