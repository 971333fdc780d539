"""Chart a bench_meta_step.py result: time per meta-step and peak memory per implementation.

usage: python bench/plot_results.py bench/results/meta_step_cpu.json [--out chart.png]
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = ap.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if "ms" in r]
    configs = sorted({(r["workload"], r["T"], r["K"]) for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(impls))
    for metric, ax, label in (("ms", axes[0], "time per meta-step (ms, log)"),
                              ("peak_mib", axes[1], "peak memory (MiB)")):
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, c in enumerate(configs):
                r = next((r for r in rows if (r["workload"], r["T"], r["K"]) == c and r["impl"] == impl), None)
                if r is not None:
                    xs.append(j + i * width)
                    ys.append(r[metric])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
        ax.set_xticklabels([f"{w}\nT={t} K={k}" for w, t, k in configs], fontsize=8)
        ax.set_ylabel(label)
        if metric == "ms":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"MAML meta-step on {m.get('device_name')} (torch {m.get('torch')})", fontsize=10)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.result)[0] + ".png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
