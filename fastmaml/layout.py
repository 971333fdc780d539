"""The flat layout of the adapted parameters (docs/design.md §3.1).

The P adapted numbers of a model are laid end to end, tensor after tensor, in ``named_parameters``
order; the fast weights of T tasks are one ``[T, P]`` buffer, and each adapted tensor is a view of a
column range. Segment ``i`` is the i-th adapted tensor: ``segments[p]`` names the tensor that
element ``p`` belongs to, which is what per-layer learning rates index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

AdaptSpec = Union[None, Callable[[str, nn.Parameter], bool], Sequence[str]]


def _is_batchnorm_param(module: nn.Module, name: str) -> bool:
    owner_name = name.rsplit(".", 1)[0] if "." in name else ""
    owner = module.get_submodule(owner_name) if owner_name else module
    # PerStepBatchNorm (MAML++'s per-step weights) is BatchNorm too: not adapted unless adapt_bn
    from .models import PerStepBatchNorm

    return isinstance(owner, (nn.modules.batchnorm._NormBase, PerStepBatchNorm))


def matching_adapt(model: nn.Module, adapt: AdaptSpec, adapt_bn: bool,
                   named: Sequence[Tuple[str, nn.Parameter]]) -> List[str]:
    """The names among ``named`` (name, parameter) pairs that the selection ``adapt`` / ``adapt_bn``
    takes, in their order: the rule of :func:`select_adapted`, without its checks."""
    if adapt is None:
        return [n for n, _ in named if adapt_bn or not _is_batchnorm_param(model, n)]
    if callable(adapt):
        return [n for n, p in named if adapt(n, p)]
    wanted = set(adapt)
    return [n for n, _ in named if n in wanted]


def select_adapted(model: nn.Module, adapt: AdaptSpec, adapt_bn: bool) -> List[str]:
    """Names of the parameters the inner loop adapts.

    ``adapt``: None (every trainable parameter, BatchNorm affine ones only if ``adapt_bn``), a
    predicate ``(name, param) -> bool``, or a list of names. Frozen parameters
    (``requires_grad=False``) are never adapted.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    if adapt is not None and not callable(adapt):
        if isinstance(adapt, str):
            raise TypeError("adapt must be a list of parameter names or a predicate, got a str; wrap it in a list")
        adapt = list(adapt)
        unknown = [n for n in adapt if n not in names]
        if unknown:
            raise ValueError(f"adapt names unknown or frozen parameters {unknown}; trainable parameters are {names}")
    chosen = matching_adapt(model, adapt, adapt_bn, named)
    if not chosen:
        raise ValueError("adapt selects no parameter: the inner loop would adapt nothing")
    return chosen


def check_unshared(model: nn.Module) -> None:
    """Refuse a model with a submodule or a parameter registered under two names (tied weights).

    ``named_parameters`` lists a shared parameter once, so the inner loop would adapt one name and
    ``functional_call`` would substitute the other with the unadapted tensor (or break the tie);
    rather than compute something else than the model's forward, such models are refused."""
    seen: Dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen and seen[id(m)] != name and any(True for _ in m.parameters()):
            raise ValueError(
                f"model: the submodule {seen[id(m)]!r} and {name!r} are the same module object (registered "
                "twice); fastmaml does not support shared (tied) submodules or parameters: keep the module "
                "under one name and call it twice in forward()")
        seen.setdefault(id(m), name)
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise ValueError(
                f"model: the parameters {seen[id(p)]!r} and {name!r} are the same tensor (tied weights); "
                "fastmaml does not support shared (tied) parameters: untie them, or use the module that "
                "owns the weight for both computations in forward()")
        seen[id(p)] = name


@dataclass(frozen=True)
class FlatLayout:
    """Where each adapted tensor lives in the flat [P] vector."""

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]
    offsets: Tuple[int, ...]  # len(names) + 1 entries; offsets[-1] == P

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> "FlatLayout":
        params = dict(model.named_parameters())
        shapes = tuple(params[n].shape for n in names)
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + s.numel())
        return cls(tuple(names), shapes, tuple(offsets))

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def num_segments(self) -> int:
        return len(self.names)

    def segments(self, device: torch.device) -> Tensor:
        """int64 [P]: the index of the adapted tensor each element belongs to."""
        sizes = torch.tensor([s.numel() for s in self.shapes], device=device)
        return torch.repeat_interleave(torch.arange(len(self.shapes), device=device), sizes)

    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        """Concatenate tensors (in layout order) into [P], or [T, P] when each carries a task dim."""
        ts = list(tensors)
        lead = ts[0].dim() - len(self.shapes[0])
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in ts], dim=-1)

    def views(self, flat: Tensor) -> Dict[str, Tensor]:
        """name -> view of ``flat`` ([P] or [T, P]) in the parameter's shape (with the task dim first).

        One ``split`` rather than a slice per tensor: its backward writes every gradient into one
        [T, P] buffer, where a slice's backward would allocate a zero-filled [T, P] per tensor."""
        lead = flat.shape[:-1]
        sizes = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        parts = torch.split(flat, sizes, dim=-1)
        return {n: part.view(*lead, *s) for n, s, part in zip(self.names, self.shapes, parts)}
