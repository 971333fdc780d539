"""Names a compat module does not accelerate come from the installed library (PEP 562 ``__getattr__``).

``import fastmaml.compat.learn2learn as l2l`` must run a learn2learn script unchanged: ``l2l.vision``,
``l2l.data``, ``l2l.clone_module``, ``l2l.algorithms.GBML``, ... are learn2learn's own objects, looked
up at each access (nothing is cached, so hiding or installing the library takes effect at once).
fastmaml's accelerated names are defined in the compat module itself and never reach this code, so
they work without the library.

When the library is missing, or installed but failing to import, the access raises an ``ImportError``
naming the compat module, the name asked for, the library and how to install it. Names starting with
an underscore are never passed through (Python's import machinery and tools probe ``__path__``,
``__wrapped__``, ...; those must see an ``AttributeError``).
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Iterable, List


def import_library(library: str, compat: str, name: str, install: str, own: Iterable[str]) -> types.ModuleType:
    """``import library`` (e.g. ``"learn2learn.algorithms"``), or an ImportError saying that ``compat.name``
    comes from it, how to install it (``install``), and which names work without it (``own``)."""
    top = library.split(".")[0]
    try:
        importlib.import_module(top)   # first: a hidden or broken top-level package hides its submodules too
        return importlib.import_module(library)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == top or e.name == library):
            raise ImportError(
                f"{compat}.{name} comes from {top}, which is not installed ({install}); "
                f"fastmaml's own names work without it: {', '.join(sorted(own))}",
                name=top,
            ) from e
        raise ImportError(f"{compat}.{name} comes from {top}, whose import failed: "
                          f"{type(e).__name__}: {e}", name=top) from e
    except Exception as e:  # noqa: BLE001  (a broken dependency of the library: say whose import failed)
        raise ImportError(f"{compat}.{name} comes from {top}, whose import failed: "
                          f"{type(e).__name__}: {e}", name=top) from e


def make_getattr(compat: str, library: str, install: str, own: Iterable[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``compat`` that returns ``library``'s attribute ``name`` (or its
    submodule ``library.name`` when the package does not import it eagerly)."""
    own = tuple(own)

    def __getattr__(name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"module {compat!r} has no attribute {name!r}")
        lib = import_library(library, compat, name, install, own)
        try:
            return getattr(lib, name)
        except AttributeError:
            pass
        try:
            return importlib.import_module(f"{library}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{library}.{name}":
                raise
        version = getattr(importlib.import_module(library.split(".")[0]), "__version__", "?")
        raise AttributeError(f"module {compat!r} has no attribute {name!r}: neither fastmaml's compat layer "
                             f"nor the installed {library} ({version}) defines it")

    return __getattr__


def make_dir(module_globals: dict, library: str) -> Callable[[], List[str]]:
    """A module ``__dir__``: the compat module's own names, plus the library's when it imports."""

    def __dir__() -> List[str]:
        names = {n for n in module_globals if not n.startswith("_")}
        try:
            names.update(n for n in dir(importlib.import_module(library)) if not n.startswith("_"))
        except Exception:  # noqa: BLE001  (dir() must not raise; the access itself says what is missing)
            pass
        return sorted(names)

    return __dir__


def namespace(qualname: str, library: str, install: str, members: dict) -> types.ModuleType:
    """A module object ``qualname`` holding ``members`` (fastmaml's overrides) whose other attributes
    come from ``library`` (e.g. ``algorithms``: our ``MAML``, learn2learn's ``GBML``)."""
    mod = types.ModuleType(qualname, f"{', '.join(sorted(members))} from fastmaml; other names from {library}.")
    mod.__dict__.update(members)
    mod.__getattr__ = make_getattr(qualname, library, install, members)  # type: ignore[attr-defined]
    mod.__dir__ = make_dir(mod.__dict__, library)  # type: ignore[attr-defined]
    return mod
