"""Old import paths of modules that moved: ``fastmaml.train`` is ``fastmaml.app.train``, and so on.

Issue 23 moved the application (the command, training, evaluation, checkpoints, configs...) from the
flat ``fastmaml/`` into :mod:`fastmaml.app`, and the torch implementations of the ops out of
``fastmaml.reference`` (which now holds only the MAML oracle). Code written before (``from fastmaml.configs import
UserError``, ``import fastmaml.train``, an installed ``fastmaml`` console script that runs
``from fastmaml.cli import main``) keeps working through :data:`MOVED`, the one table of moves: a
finder on ``sys.meta_path`` answers an old name with the new module object itself, so that
``fastmaml.train.X is fastmaml.app.train.X`` and monkeypatching either name patches both. There are
no shim files. ``python -m fastmaml.cli`` runs the new module's code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Dict

#: old module name -> the module it now is
MOVED: Dict[str, str] = {
    "fastmaml.cli": "fastmaml.app.cli",
    "fastmaml.train": "fastmaml.app.train",
    "fastmaml.evaluate": "fastmaml.app.evaluate",
    "fastmaml.plots": "fastmaml.app.plots",
    "fastmaml.configs": "fastmaml.app.configs",
    "fastmaml.checkpoint": "fastmaml.app.checkpoint",
    "fastmaml.metrics_file": "fastmaml.app.metrics_file",
    "fastmaml.progress": "fastmaml.app.progress",
    "fastmaml.run_info": "fastmaml.app.run_info",
    "fastmaml.run_guard": "fastmaml.app.run_guard",
    "fastmaml.termination": "fastmaml.app.termination",
    "fastmaml.bench_command": "fastmaml.app.bench_command",
    "fastmaml.distributed_args": "fastmaml.app.distributed_args",
    # "reference" names only the MAML oracle (fastmaml/reference/maml.py); the torch implementations of
    # the ops moved beside their backends
    "fastmaml.reference.ops": "fastmaml.kernels.flat_torch",
    "fastmaml.reference.cg_ops": "fastmaml.kernels.cg_torch",
    "fastmaml.layers.reference": "fastmaml.layers.torch_kernels",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old name of :data:`MOVED` as the module it now is (the same object, once)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # restored by exec_module, see there
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has set module.__spec__ to the old name's spec (importlib's
        # _init_module_attrs always does): give the module its own back, so that reload(), pickle and
        # tracebacks keep its real name. Nothing is executed: the module ran when it was imported.
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname: str):
        """``python -m fastmaml.cli``: runpy asks the old name's loader for code to run as ``__main__``.
        The new module's own code would run with the old package (``fastmaml``) for its relative
        imports, so the code given runs the new module by its name instead."""
        return compile(f"import runpy\nrunpy.run_module({MOVED[fullname]!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname}: moved to {MOVED[fullname]}>", "exec")

    def is_package(self, fullname: str) -> bool:
        return False


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once per interpreter (``fastmaml/__init__.py`` calls
    it). First: a stale ``fastmaml/train.py`` left by an old install must not shadow the move."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
