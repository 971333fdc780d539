"""What a learner was built with: every parameter of its model, to notice changes made afterwards.

A learner fixes at construction which parameters the inner loop adapts (their flat [P] layout, the
per-layer inner learning rates, the compiled fused program) and the optimizer holds the parameter
tensors themselves. Changing the model afterwards (replacing or appending a layer, assigning a
parameter of another shape, freezing an adapted parameter) would otherwise end deep inside torch
(``split_with_sizes``) or, worse, train tensors that are no longer in the model.

:class:`ParamRecord` keeps (name, tensor, shape, requires_grad) of every parameter; ``same_as`` is
one pass over ``named_parameters()`` comparing identities and shapes (no tensor data is read), cheap
enough for every call; :meth:`structure_change` and :meth:`trainable_change` explain a difference.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ParamEntry", "ParamRecord"]


class ParamEntry(NamedTuple):
    name: str
    param: nn.Parameter  # kept alive, so that a new tensor can never take its id
    shape: torch.Size
    trainable: bool


def _shape(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


class ParamRecord:
    """The parameters of ``model`` as they are now (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: Tuple[ParamEntry, ...] = tuple(
            ParamEntry(n, p, p.shape, p.requires_grad) for n, p in model.named_parameters())

    def same_as(self, current: Sequence[Tuple[str, nn.Parameter]]) -> bool:
        """Whether ``current`` (the model's ``named_parameters()`` now) is what was recorded."""
        if len(current) != len(self.entries):
            return False
        for (n, p), e in zip(current, self.entries):
            if n != e.name or p is not e.param or p.requires_grad != e.trainable or p.shape != e.shape:
                return False
        return True

    def structure_change(self, current: Sequence[Tuple[str, nn.Parameter]]) -> Optional[str]:
        """What changed in the parameters themselves (names, tensors, shapes), one clause per
        parameter (``model.<name> ...``), or None when only ``requires_grad`` flags differ."""
        old = {e.name: e for e in self.entries}
        new = dict(current)
        what: List[str] = []
        for e in self.entries:
            p = new.get(e.name)
            if p is None:
                what.append(f"model.{e.name} ({_shape(e.shape)}) is gone")
            elif p is not e.param:
                same = "the same shape" if p.shape == e.shape else f"shape {_shape(p.shape)}"
                what.append(f"model.{e.name} is another tensor ({same}; the learner was built with "
                            f"{_shape(e.shape)}): its module or the parameter was replaced")
            elif p.shape != e.shape:
                what.append(f"model.{e.name} changed shape from {_shape(e.shape)} to {_shape(p.shape)}")
        for n, p in current:
            if n not in old:
                what.append(f"model.{n} ({_shape(p.shape)}) was added")
        return "; ".join(what) if what else None

    def trainable_change(self, current: Sequence[Tuple[str, nn.Parameter]]) -> Tuple[List[str], List[str]]:
        """(names frozen since, names made trainable since): ``requires_grad`` now versus then
        (call when :meth:`structure_change` is None)."""
        now = {n: p.requires_grad for n, p in current}
        frozen = [e.name for e in self.entries if e.trainable and not now[e.name]]
        thawed = [e.name for e in self.entries if not e.trainable and now[e.name]]
        return frozen, thawed
