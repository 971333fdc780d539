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
    workloads = sorted({r["workload"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    most = max(len({(r["T"], r["K"]) for r in rows if r["workload"] == w}) for w in workloads)
    fig, axes = plt.subplots(len(workloads), 2, figsize=(max(12, 0.9 * most * 2), 4.2 * len(workloads)),
                             squeeze=False)
    width = 0.8 / max(1, len(impls))
    for row_axes, workload in zip(axes, workloads):
        configs = sorted({(r["T"], r["K"]) for r in rows if r["workload"] == workload})
        for metric, ax, label in (("ms", row_axes[0], "time per meta-step (ms, log)"),
                                  ("peak_mib", row_axes[1], "peak memory (MiB, log)")):
            for i, impl in enumerate(impls):
                xs, ys = [], []
                for j, c in enumerate(configs):
                    r = next((r for r in rows if (r["workload"], r["T"], r["K"]) == (workload, *c)
                              and r["impl"] == impl), None)
                    if r is not None and r[metric] > 0:
                        xs.append(j + i * width)
                        ys.append(r[metric])
                ax.bar(xs, ys, width, label=impl, color=f"C{i % 10}")  # one colour per impl everywhere
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
            ax.set_xticklabels([f"T={t}\nK={k}" for t, k in configs], fontsize=7)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(workload, fontsize=9)
        row_axes[0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"MAML meta-step on {m.get('device_name')} (torch {m.get('torch')})", fontsize=10)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.result)[0] + ".png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
