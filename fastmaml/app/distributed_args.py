"""The command-line options of data-parallel training (``--nproc``, ``--dist-timeout``).

Apart from :mod:`fastmaml.app.distributed_train`, which imports torch: ``fastmaml train --help`` and argument
errors must answer without importing it (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import math

DEFAULT_TIMEOUT_S = 600.0


def _positive_seconds(text: str) -> float:
    """--dist-timeout: checked when the command line is parsed, so that a bad value is refused with or
    without --nproc, once (by the launcher, before any rank starts)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1e9:  # NaN fails too; timedelta overflows beyond about 8.6e13 seconds
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds (at most 1e9), got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel training in N processes on this machine (each takes 1/N of every "
                        "meta-batch; the results match 1 process up to rounding). For several machines use "
                        "torchrun --nnodes ... -m fastmaml train")
    p.add_argument("--dist-timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"distributed runs: seconds before a rank that waits on a dead or hung one gives up "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
