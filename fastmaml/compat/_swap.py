"""Calling a module with other tensors in place of its parameters (and buffers), without copying it."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor, nn


class Slots:
    """Every (submodule, key) that holds one of ``module.parameters()`` (tied parameters: each place),
    with the index of that parameter in ``list(module.parameters())``; likewise for buffers."""

    __slots__ = ("params", "buffers", "param_slots", "buffer_slots")

    def __init__(self, module: nn.Module) -> None:
        self.params: List[Tensor] = list(module.parameters())
        self.buffers: List[Tensor] = list(module.buffers())
        pidx = {id(p): i for i, p in enumerate(self.params)}
        bidx = {id(b): i for i, b in enumerate(self.buffers)}
        self.param_slots: List[Tuple[nn.Module, str, int]] = []
        self.buffer_slots: List[Tuple[nn.Module, str, int]] = []
        for m in module.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    self.param_slots.append((m, k, pidx[id(p)]))
            for k, b in m._buffers.items():
                if b is not None:
                    self.buffer_slots.append((m, k, bidx[id(b)]))


def call_with(module: nn.Module, slots: Slots, params: Sequence[Tensor], buffers, args, kwargs):
    """``module(*args, **kwargs)`` with ``params`` (aligned with ``module.parameters()``) and, unless
    None, ``buffers`` (aligned with ``module.buffers()``) in place of its own, restored afterwards."""
    saved_p = [(m, k, m._parameters[k]) for m, k, _ in slots.param_slots]
    for m, k, i in slots.param_slots:
        m._parameters[k] = params[i]
    saved_b = None
    if buffers is not None:
        saved_b = [(m, k, m._buffers[k]) for m, k, _ in slots.buffer_slots]
        for m, k, i in slots.buffer_slots:
            m._buffers[k] = buffers[i]
    try:
        return module(*args, **kwargs)
    finally:
        for m, k, p in saved_p:
            m._parameters[k] = p
        if saved_b is not None:
            for m, k, b in saved_b:
                m._buffers[k] = b
