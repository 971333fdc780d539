"""Merge bench_meta_step.py results of one machine (e.g. the parts of a sweep run with different
implementation lists) into one JSON, and print the sweep as one line per configuration.

usage: python bench/merge_results.py OUT.json IN.json [IN.json ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import table, write_json  # noqa: E402


def merge(paths: List[str]) -> Dict[str, object]:
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    machines = {json.dumps(part["machine"].get("device_name")) for part in parts}
    if len(machines) > 1:
        raise SystemExit(f"results of different machines ({', '.join(sorted(machines))}) are not merged: "
                         "ratios are only meaningful within one machine")
    rows: Dict[tuple, Dict[str, object]] = {}
    for part in parts:
        for r in part["rows"]:
            r = {k: v for k, v in r.items() if not k.startswith(("speedup_vs_", "memory_vs_"))}
            rows[(r["workload"], r["T"], r["K"], r["impl"])] = r  # a later file's row wins
    from bench_meta_step import add_ratios

    merged = list(rows.values())
    add_ratios(merged)
    runs: List[Dict[str, object]] = []
    for p in parts:  # an input may itself be a merge
        runs.extend(p["parts"] if "parts" in p else
                    [dict(args=p["args"], skipped=p.get("skipped"), partial=p.get("partial"))])
    return {"machine": parts[0]["machine"], "parts": runs, "rows": merged}


def _short(error: object) -> str:
    e = str(error)
    for key, word in (("out of memory", "OOM"), ("not run", "not run"), ("timed out", "timeout")):
        if key in e:
            return word
    return "error"


def pivot(rows: List[Dict[str, object]]) -> str:
    """One line per (workload, T, K): ms (peak MiB) of each implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = []
    for key in sorted({(r["workload"], r["T"], r["K"]) for r in rows}):
        line: Dict[str, object] = dict(workload=key[0], T=key[1], K=key[2])
        for r in rows:
            if (r["workload"], r["T"], r["K"]) == key:
                line[r["impl"]] = f"{r['ms']:.1f} ({r['peak_mib']:.0f})" if "ms" in r else _short(r.get("error"))
        lines.append(line)
    return table(lines, ["workload", "T", "K", *impls])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    result = merge(args.inputs)
    print("ms per meta-step (peak MiB):")
    print(pivot(result["rows"]))
    out_dir, name = os.path.split(os.path.abspath(args.out))
    print("wrote", write_json(name[:-5] if name.endswith(".json") else name, result, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
