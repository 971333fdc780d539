"""fastmaml: task-batched MAML with exact meta-gradients and fused kernels.

The public names (``fastmaml.MAML``, ``fastmaml.ANIL``, ...) and the submodules
(``fastmaml.models``, ``fastmaml.kernels``, ...) are imported on first use (PEP 562): importing the
package does not import torch, so that the ``fastmaml`` command's ``--help`` and its argument errors
answer at once (tests/test_cli_startup.py). ``from fastmaml import MAML`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from . import _moved

__version__ = "0.1.0"

_moved.install()  # the old names of the application's modules: fastmaml.train -> fastmaml.app.train, ...

#: public name -> the submodule that defines it
_EXPORTS = {
    "MAML": ".maml",
    "FastWeights": ".maml",
    "MetaStepOutput": ".maml",
    "ANIL": ".algorithms",  # issue 14: the rest of the MAML family
    "Reptile": ".algorithms",
    "IMAML": ".algorithms",
    "MAMLPPSchedule": ".algorithms",
}

__all__ = ["MAML", "FastWeights", "MetaStepOutput", "ANIL", "Reptile", "IMAML", "MAMLPPSchedule", "__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .algorithms import ANIL, IMAML, MAMLPPSchedule, Reptile
    from .maml import MAML, FastWeights, MetaStepOutput


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        try:  # a submodule: fastmaml.models, fastmaml.kernels, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists but an import inside it failed
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
