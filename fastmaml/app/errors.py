"""The two errors the application reports to the user in one line, without a traceback.

:class:`UserError` (exit status 2) is a mistake in the command line, the config, the data or the run
folder; :class:`TrainingError` (exit status 1) is a training run that cannot go on. ``fastmaml``
(:mod:`fastmaml.app.cli`) prints either as ``fastmaml: error: ...`` and exits with its ``code``.
They live here, at the bottom of the application, so that every module can raise them without
importing the command that catches them.
"""

from __future__ import annotations

__all__ = ["UserError", "TrainingError", "first_line"]


class UserError(Exception):
    """A mistake in the command line, the config, the data or the run folder: reported in one line,
    exit status ``code`` (2), and nothing on disk has been changed."""

    code = 2


class TrainingError(UserError):
    """Training cannot go on (for example the loss became non-finite); exit status 1."""

    code = 1


def first_line(e: BaseException) -> str:
    """``e``'s message on one line, at most 400 characters (a reported error stays one line)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else text[:400] + "..."
