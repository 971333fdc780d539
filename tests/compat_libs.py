"""The libraries the compat tests compare against: learn2learn 0.2.0, higher 0.2.1, TorchOpt 0.7.3.

``library(name)`` returns the imported module. When it is absent the test skips with the reason, unless
``FASTMAML_REQUIRE_COMPAT_LIBS`` is set (the README's test command and CI set it, after
tests/install_compat_libs.py): then the test fails, so that a broken install cannot hide as skips.

learn2learn imports torchvision at import time; PyPI has no torchvision that imports beside the CPU
torch 2.13, and nothing these tests run uses it, so learn2learn is imported with bench/baselines.py's
throw-away torchvision stub in place (removed from ``sys.modules`` right after) when no working
torchvision is installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
from typing import Dict, Tuple

import pytest

REQUIRE_ENV = "FASTMAML_REQUIRE_COMPAT_LIBS"
VERSIONS = {"learn2learn": "0.2.0", "higher": "0.2.1", "torchopt": "0.7.3"}
_LOADED: Dict[str, Tuple[object, str]] = {}


def _import(name: str) -> types.ModuleType:
    if name != "learn2learn":
        return importlib.import_module(name)
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
    sys.path.insert(0, bench)
    try:
        from baselines import import_learn2learn
    finally:
        sys.path.remove(bench)
    return import_learn2learn()


def load(name: str):
    """(module or None, why it is missing or unusable: not importable, or another version than tested)."""
    if name not in _LOADED:
        hint = "install it with python tests/install_compat_libs.py"
        try:
            mod = _import(name)
            have = importlib.metadata.version(name)
            if have != VERSIONS[name]:
                _LOADED[name] = (None, f"{name} {have} is installed, the compat tests compare with "
                                       f"{VERSIONS[name]} ({hint})")
            else:
                _LOADED[name] = (mod, "")
        except Exception as e:  # noqa: BLE001  (any failure to import is "not available here", with its reason)
            _LOADED[name] = (None, f"{name} is not importable here ({type(e).__name__}: {e}); {hint}")
    return _LOADED[name]


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def library(name: str) -> types.ModuleType:
    """The installed library, else skip (or fail under FASTMAML_REQUIRE_COMPAT_LIBS)."""
    mod, why = load(name)
    if mod is None:
        if required():
            pytest.fail(f"{REQUIRE_ENV} is set but {why}")
        pytest.skip(why)
    return mod
