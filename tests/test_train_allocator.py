"""``fastmaml train`` / ``eval`` keep freed memory for reuse (``fastmaml.app.run_setup.keep_freed_memory``): the large
temporaries of a meta-step stop page-faulting, and nothing computed changes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from test_cli import subprocess_env

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

# In the process that `fastmaml train` / `eval` are when they call keep_freed_memory: the application
# imported. The heap's layout (what small blocks sit next to the freed 40 MiB ones) depends on what
# was imported before; with torch alone, 4 of the 10 allocations below still grow the heap.
FAULTS = """
import json, resource, sys, torch
import fastmaml.app.train, fastmaml.app.evaluate
from fastmaml.app.run_setup import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# warm-up until the heap is at its steady size: two allocations in a row on reused pages (at most 20).
# Small blocks allocated between two 40 MiB ones can be carved out of the freed 40 MiB chunk, so the
# next one grows the heap once more; how many times that happens depends on the import-time heap
# (0-3 extra growths measured over hash seeds), not on keep_freed_memory.
reused = 0
for _ in range(20):
    start = faults()
    x = torch.ones(10 * 2**20)  # 40 MiB: above glibc's largest default mmap threshold (32 MiB)
    del x
    reused = reused + 1 if faults() - start < 100 else 0
    if reused == 2:
        break
before = faults()
for _ in range(10):
    x = torch.ones(10 * 2**20)
    del x
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _faults(env_extra):
    env = subprocess_env()
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    kept = _faults({})
    default = _faults({"FASTMAML_MALLOC": "default"})
    assert kept["applied"] is True and default["applied"] is False
    # 10 allocations of 40 MiB = 102,400 fresh pages with the default malloc; none once kept
    assert default["faults"] > 50_000, default
    assert kept["faults"] < 1_000, kept


def _train(tmp_path, name, env_extra):
    env = subprocess_env()
    env.update(env_extra)
    out = tmp_path / name
    subprocess.run([sys.executable, "-m", "fastmaml", "train", "sinusoid-tiny", "--out", str(out), "--threads", "1",
                    "--quiet", "--set", "iterations=30", "log_every=10", "val_every=15", "checkpoint_every=15"],
                   env=env, check=True, capture_output=True, cwd=tmp_path)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for l in lines:  # timings differ from run to run; everything else must not
        l.pop("tasks_per_s", None)
        l.pop("elapsed", None)
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return lines, model


@glibc
def test_training_is_bitwise_the_same_with_the_default_malloc(tmp_path):
    a_lines, a_model = _train(tmp_path, "kept", {})
    b_lines, b_model = _train(tmp_path, "default", {"FASTMAML_MALLOC": "default"})
    assert a_lines == b_lines and len(a_lines) == 5
    assert a_model.keys() == b_model.keys()
    assert all(torch.equal(a_model[k], b_model[k]) for k in a_model)
