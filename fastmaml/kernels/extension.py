"""The one probe of the compiled extension ``fastmaml._C`` (every op family asks here).

``FASTMAML_NO_EXT=1`` (read here and nowhere else at run time; setup.py reads it at build time)
means: do not load the extension, run every op on its torch implementation. Otherwise the
extension is imported once; importing it registers its ``torch.ops`` namespaces (``fastmaml``:
the flat-layout and layer ops, ``fastmaml_cg``: the CG ops).
"""

from __future__ import annotations

import functools
import os
from typing import List, Sequence, Tuple

import torch


def disabled() -> bool:
    """FASTMAML_NO_EXT=1: the extension is not to be loaded."""
    return os.environ.get("FASTMAML_NO_EXT") == "1"


@functools.lru_cache(maxsize=None)
def load() -> Tuple[bool, str]:
    """(loaded, reason): imports ``fastmaml._C`` once unless FASTMAML_NO_EXT=1."""
    if disabled():
        return False, "FASTMAML_NO_EXT=1 is set"
    try:
        import fastmaml._C  # noqa: F401  (loading it registers torch.ops.fastmaml)
    except ImportError as e:
        return False, f"the C++ extension fastmaml._C is not built or failed to load ({e})"
    return True, "compiled extension fastmaml._C"


def missing_kernels(namespace: str, names: Sequence[str], dispatch_key: str = "CPU") -> List[str]:
    """The ops of ``torch.ops.<namespace>`` among ``names`` without a kernel for ``dispatch_key``."""
    missing = []
    for name in names:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key)
        except RuntimeError:  # the op is not defined at all
            has = False
        if not has:
            missing.append(name)
    return missing


@functools.lru_cache(maxsize=None)
def why_not_available(namespace: str, names: Tuple[str, ...]) -> str:
    """Why ``torch.ops.<namespace>`` cannot serve ``names`` on the CPU ("" when it can); cached."""
    loaded, why = load()
    if not loaded:
        return why
    missing = missing_kernels(namespace, names, "CPU")
    return (f"fastmaml._C was built without CPU kernels for {', '.join(missing)}: rebuild it "
            "(pip install --no-build-isolation -e .)") if missing else ""


def ops(namespace: str, names: Sequence[str]):
    """``torch.ops.<namespace>`` when the extension is loaded with CPU kernels for ``names``; else a
    RuntimeError that says why (for callers that call compiled ops directly, such as the layer
    families' C++ wrappers)."""
    why = why_not_available(namespace, tuple(names))
    if why:
        raise RuntimeError(f"the C++ kernels {', '.join(names)} are not available: {why}")
    return getattr(torch.ops, namespace)
