"""Shared setup of the pytest-benchmark cases (run explicitly; CI's ``testpaths`` excludes them).

* ``fastmaml`` (the repository root) and the ``bench/`` helpers (``bench_meta_step``, ``models``,
  ``common``) become importable.
* torch runs on one thread unless ``FASTMAML_BENCH_THREADS`` says otherwise (0: torch's default).
  The reference machine has 2 noisy cores: with 2 intra-op threads every op competes with the
  pytest process and whatever else runs there, so round times scatter; one thread gives numbers
  that repeat and compare across runs. Set here, at import, before anything is timed.
* No ``TRITON_INTERPRET``: Triton's CPU interpreter checks correctness but says nothing about
  speed, so the Triton cases need CUDA and are skipped without it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for path in (BENCH, ROOT):  # ROOT ends up first: the checkout's fastmaml wins over an installed one
    if path not in sys.path:
        sys.path.insert(0, path)

CUDA = torch.cuda.is_available()

_threads = int(os.environ.get("FASTMAML_BENCH_THREADS", "1") or "1")
if _threads > 0:
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


def pytest_report_header(config):
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    return f"fastmaml benchmarks: device={name}, torch {torch.__version__}, threads={torch.get_num_threads()}"
