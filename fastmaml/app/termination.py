"""SIGTERM as an exception, for the commands that have no stop handler of their own (``eval``, ``plot``).

By default SIGTERM ends Python at once, without a word, while Ctrl-C (SIGINT) raises
KeyboardInterrupt and ``fastmaml`` prints ``fastmaml: interrupted``. Inside :func:`sigterm_raises`
SIGTERM raises :class:`Terminated` (a KeyboardInterrupt, so every cleanup that runs on Ctrl-C runs:
temporary files of atomic writes are removed, nothing half written is left), which the command line
reports in one line with exit status 143 (128 + SIGTERM). ``fastmaml train`` handles SIGTERM itself
(it checkpoints and stops).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

__all__ = ["Terminated", "sigterm_raises", "EXIT_STATUS"]

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (see the module docstring)."""


def _raise(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (the main thread only; elsewhere a no-op)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: signals cannot be handled here
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
