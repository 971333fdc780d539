"""The ``fastmaml`` command: argument parsing and dispatch.

Each subcommand lives in its own module, listed in :data:`COMMANDS`. A command module defines
``COMMAND_HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``; adding a command is
one line here. User mistakes (:class:`fastmaml.app.errors.UserError`) end in a one-line
``fastmaml: error: ...`` on stderr and exit status 2 (1 for a training failure), without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Dict, List, Optional

from .errors import UserError
from .termination import EXIT_STATUS, Terminated

#: subcommand name -> module implementing it (imported when the parser is built)
COMMANDS: Dict[str, str] = {
    "train": "fastmaml.app.train",
    "eval": "fastmaml.app.evaluate",
    "plot": "fastmaml.app.plots",
    "configs": "fastmaml.app.configs",
    "bench": "fastmaml.app.bench_command",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """argparse with errors in the one-line ``fastmaml: error: ...`` form (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"fastmaml: error: {_one_line(message)}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="fastmaml", description="Task-batched MAML: train, evaluate and plot the paper's experiments.")
    parser.add_argument("--version", action="version", version=f"fastmaml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.COMMAND_HELP.replace("%", "%%"),
                           description=getattr(module, "COMMAND_DESCRIPTION", module.COMMAND_HELP))
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        print(f"fastmaml: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):  # SIGTERM during eval or plot (fastmaml/app/termination.py)
            print("fastmaml: terminated (SIGTERM)", file=sys.stderr)
            return EXIT_STATUS
        print("fastmaml: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `fastmaml configs | head`: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        # a file system failure that nothing checked for ahead (disk full, ...): one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"fastmaml: error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
