"""The implementation of :mod:`fastmaml.compat.learn2learn` (documented there); kept apart so that the
public module's namespace holds only learn2learn's names (a global ``nn`` there would hide ``l2l.nn``)."""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import grad

from ._checks import CallCounter, check_flag, check_loss, check_module, check_rate
from ._swap import Slots, call_with

__all__ = ["MAML", "MetaSGD"]

_NAME = "fastmaml.compat.learn2learn"
INSTALL = "pip install learn2learn==0.2.0; on Python 3.11+ see tests/install_compat_libs.py"
_CONSEQUENCE = "learn2learn would take the step and turn every .grad into NaN"


# -- clones ------------------------------------------------------------------------------------------
class _Learner:
    """A clone: fast weights (aligned with ``model.parameters()``), adapted by SGD steps."""

    __slots__ = ("_owner", "_fast", "_lrs", "first_order", "allow_unused", "allow_nograd", "_index", "_adapts")

    def __init__(self, owner, fast: List[Tensor], lrs, first_order: bool, allow_unused: bool, allow_nograd: bool,
                 index: str):
        self._owner = owner
        self._fast = fast
        self._lrs = lrs
        self.first_order = first_order
        self.allow_unused = allow_unused
        self.allow_nograd = allow_nograd
        self._index = index      # which clone this is, for error messages
        self._adapts = 0         # adapt() calls so far

    # -- learn2learn's API -------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._owner.module

    @property
    def lr(self):
        return self._owner.lr

    @property
    def lrs(self):
        return self._lrs

    def __call__(self, *args, **kwargs):
        return call_with(self._owner.module, self._owner._slots, self._fast, None, args, kwargs)

    forward = __call__

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        owner = f"{_NAME}: {self._index}.adapt()"
        first_order = self.first_order if first_order is None else check_flag(owner, "first_order", first_order)
        self._adapts += 1
        check_loss(_NAME, loss, f"adapt() call {self._adapts} of {self._index}", _CONSEQUENCE)
        if self._lrs is not None:  # MetaSGD: learn2learn's MetaSGD.adapt has no allow_* arguments
            self._fast = _step(loss, self._fast, self._lrs, not first_order, False, False)
            return
        allow_unused = self.allow_unused if allow_unused is None else check_flag(owner, "allow_unused", allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else check_flag(owner, "allow_nograd", allow_nograd)
        self._fast = _step(loss, self._fast, self._owner.lr, not first_order, allow_unused, allow_nograd)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "_Learner":
        owner = f"{_NAME}: {self._index}.clone()"
        return _Learner(self._owner, list(self._fast), self._lrs,
                        self.first_order if first_order is None else check_flag(owner, "first_order", first_order),
                        self.allow_unused if allow_unused is None else check_flag(owner, "allow_unused", allow_unused),
                        self.allow_nograd if allow_nograd is None else check_flag(owner, "allow_nograd", allow_nograd),
                        f"a clone of {self._index}")

    def parameters(self, recurse: bool = True) -> Iterator[Tensor]:
        yield from self._fast
        if self._lrs is not None:
            yield from self._lrs

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[Tuple[str, Tensor]]:
        names = [n for n, _ in self._owner.module.named_parameters()]
        for n, p in zip(names, self._fast):
            yield (prefix + "module." + n, p)
        if self._lrs is not None:
            for i, p in enumerate(self._lrs):
                yield (prefix + f"lrs.{i}", p)

    def train(self, mode: bool = True) -> "_Learner":
        self._owner.module.train(mode)
        return self

    def eval(self) -> "_Learner":
        return self.train(False)

    def __repr__(self) -> str:
        return f"{type(self._owner).__name__}.clone()({self._owner.module!r})"


def _step(loss: Tensor, params: List[Tensor], lr, second_order: bool, allow_unused: bool,
          allow_nograd: bool) -> List[Tensor]:
    """One SGD step on ``params`` as learn2learn's maml_update / meta_sgd_update take it."""
    if allow_nograd:
        diff = [p for p in params if p.requires_grad]
        got = iter(grad(loss, diff, retain_graph=second_order, create_graph=second_order,
                        allow_unused=allow_unused))
        grads = [next(got) if p.requires_grad else None for p in params]
    else:
        try:
            grads = grad(loss, params, retain_graph=second_order, create_graph=second_order,
                         allow_unused=allow_unused)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{_NAME}: maybe try with allow_nograd=True and/or "
                               "allow_unused=True ?") from e
    if isinstance(lr, (list, tuple, nn.ParameterList)):  # MetaSGD: one rate tensor per parameter
        return [p if g is None else p - r * g for p, r, g in zip(params, lr, grads)]
    return [p if g is None else p + (-lr) * g for p, g in zip(params, grads)]


class MAML(nn.Module):
    """learn2learn 0.2's ``MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False)``."""

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False) -> None:
        owner = f"{_NAME}.{type(self).__name__}"
        super().__init__()
        self.module = check_module(owner, "model", model)
        self.lr = check_rate(owner, "lr", lr)
        self.first_order = check_flag(owner, "first_order", first_order)
        self.allow_nograd = check_flag(owner, "allow_nograd", allow_nograd)
        allow_unused = check_flag(owner, "allow_unused", allow_unused, none_ok=True)
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self._fast: Optional[List[Tensor]] = None
        self._adapts = 0
        self._clones = CallCounter()  # clone() calls since the meta-parameters changed: the task index

    @property
    def _slots(self) -> Slots:
        # rebuilt when the parameters were replaced (model.to(...), load_state_dict(assign=True), ...)
        s = self.__dict__.get("_slots_cache")
        params = list(self.module.parameters())
        if s is None or len(s.params) != len(params) or any(a is not b for a, b in zip(s.params, params)):
            s = Slots(self.module)
            self.__dict__["_slots_cache"] = s
        return s

    def forward(self, *args, **kwargs):
        if self._fast is None:
            return self.module(*args, **kwargs)
        return call_with(self.module, self._slots, self._fast, None, args, kwargs)

    def _lrs(self):
        return None

    def _clone_index(self) -> str:
        n = self._clones.next(self._slots.params)
        return f"clone #{n} (clone() call {n} since the meta-parameters last changed)"

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> _Learner:
        owner = f"{_NAME}.{type(self).__name__}.clone()"
        fast = list(self._fast) if self._fast is not None else list(self._slots.params)
        return _Learner(self, fast, self._lrs(),
                        self.first_order if first_order is None else check_flag(owner, "first_order", first_order),
                        self.allow_unused if allow_unused is None else check_flag(owner, "allow_unused", allow_unused),
                        self.allow_nograd if allow_nograd is None else check_flag(owner, "allow_nograd", allow_nograd),
                        self._clone_index())

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """Adapting the meta-learner itself (not a clone): later calls use its fast weights, and
        ``parameters()`` stays the model's own."""
        owner = f"{_NAME}.{type(self).__name__}.adapt()"
        first_order = self.first_order if first_order is None else check_flag(owner, "first_order", first_order)
        allow_unused = self.allow_unused if allow_unused is None else check_flag(owner, "allow_unused", allow_unused)
        allow_nograd = self.allow_nograd if allow_nograd is None else check_flag(owner, "allow_nograd", allow_nograd)
        self._adapts += 1
        check_loss(_NAME, loss, f"adapt() call {self._adapts} on the {type(self).__name__} itself", _CONSEQUENCE)
        fast = list(self._fast) if self._fast is not None else list(self._slots.params)
        self._fast = _step(loss, fast, self.lr, not first_order, allow_unused, allow_nograd)


class MetaSGD(MAML):
    """learn2learn 0.2's ``MetaSGD(model, lr=1.0, first_order=False, lrs=None)``: per-parameter rates
    ``lrs`` (an ``nn.ParameterList``, initialized to ``lr``) are meta-learned with the model."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False,
                 lrs: Optional[Sequence[Tensor]] = None) -> None:
        super().__init__(model, lr, first_order)
        n = len(list(model.parameters()))
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in model.parameters()])
        elif isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__len__") or len(lrs) != n \
                or not all(isinstance(r, Tensor) for r in lrs):
            got = f"{len(lrs)} items" if hasattr(lrs, "__len__") else type(lrs).__name__
            raise TypeError(f"{_NAME}.MetaSGD: lrs must be None or one tensor per parameter of the model "
                            f"({n}), got {got}")
        self.lrs = lrs

    def _lrs(self):
        return self.lrs

    def clone(self, first_order: Optional[bool] = None, allow_unused=None, allow_nograd=None) -> _Learner:
        return super().clone(first_order)

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None) -> None:
        first_order = self.first_order if first_order is None else \
            check_flag(f"{_NAME}.MetaSGD.adapt()", "first_order", first_order)
        self._adapts += 1
        check_loss(_NAME, loss, f"adapt() call {self._adapts} on the MetaSGD itself", _CONSEQUENCE)
        fast = list(self._fast) if self._fast is not None else list(self._slots.params)
        self._fast = _step(loss, fast, self.lrs, not first_order, False, False)
