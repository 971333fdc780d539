"""The implementation of :mod:`fastmaml.compat.higher` (documented there); kept apart so that the public
module's namespace holds only higher's names."""


from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._checks import CallCounter, check_loss, check_module
from ._swap import Slots, call_with

__all__ = ["innerloop_ctx", "FunctionalModule", "DifferentiableSGD", "SUPPORTED"]

SUPPORTED = "torch.optim.SGD (lr, momentum, dampening, weight_decay, nesterov)"
_NAME = "fastmaml.compat.higher"
_CONSEQUENCE = "higher would take the step and turn every .grad into NaN"
# innerloop_ctx calls per model since its parameters last changed: the task index an error names
_CONTEXTS: "weakref.WeakKeyDictionary[nn.Module, CallCounter]" = weakref.WeakKeyDictionary()


class FunctionalModule:
    """higher's patched module: ``fmodel(*args, params=None)`` runs the model with the fast weights."""

    def __init__(self, module: nn.Module, copy_initial_weights: bool, track_higher_grads: bool,
                 device: Optional[torch.device] = None) -> None:
        self.module = module
        self._slots = Slots(module)
        if copy_initial_weights:
            init = [p.clone().detach().requires_grad_(p.requires_grad) for p in self._slots.params]
        else:
            init = [p.clone() for p in self._slots.params]
        if device is not None:
            init = [p.to(device) for p in init]
        self._buffers = [b.clone() if device is None else b.clone().to(device) for b in self._slots.buffers]
        self._fast_params: List[List[Tensor]] = [init]
        self.track_higher_grads = track_higher_grads

    def __call__(self, *args, params: Optional[Sequence[Tensor]] = None, **kwargs):
        params = self.fast_params if params is None else list(params)
        return call_with(self.module, self._slots, params, self._buffers, args, kwargs)

    forward = __call__

    @property
    def fast_params(self) -> List[Tensor]:
        return self._fast_params[-1]

    @property
    def init_fast_params(self) -> List[Tensor]:
        if not self.track_higher_grads:
            raise Exception("Cannot get initial parameters when not tracking higher gradients.")
        return self._fast_params[0]

    def update_params(self, params: Sequence[Tensor]) -> None:
        if self.track_higher_grads:
            self._fast_params.append(list(params))
        else:
            self._fast_params[0] = list(params)

    def parameters(self, time: Optional[int] = None) -> Iterator[Tensor]:
        time = -1 if time is None else time
        if not self.track_higher_grads and time not in (-1, 0):
            raise ValueError("The patched model is not tracking higher gradients. Only the latest parameters "
                             "are available.")
        return iter(self._fast_params[time])

    def named_parameters(self):
        return zip([n for n, _ in self.module.named_parameters()], self.fast_params)

    def buffers(self) -> Iterator[Tensor]:
        return iter(self._buffers)

    def train(self, mode: bool = True) -> "FunctionalModule":
        self.module.train(mode)
        return self

    def eval(self) -> "FunctionalModule":
        return self.train(False)


class DifferentiableSGD:
    """higher's DifferentiableSGD: ``step(loss, params=None, override=None, grad_callback=None)``."""

    def __init__(self, opt: torch.optim.SGD, fmodel: FunctionalModule, track_higher_grads: bool = True,
                 override: Optional[Dict] = None, grad_callback=None) -> None:
        reference = fmodel._slots.params
        index = {id(p): i for i, p in enumerate(reference)}
        self.param_groups: List[Dict] = []
        self._group_to_param_list: List[List[int]] = []
        self.state: List[Dict[int, Dict]] = []
        for group in opt.param_groups:
            if group.get("maximize", False):
                raise NotImplementedError(f"fastmaml.compat.higher supports {SUPPORTED}; maximize=True is not supported")
            ids = []
            for p in group["params"]:
                if id(p) not in index:
                    raise ValueError(f"Could not find parameter {p} in reference parameters.")
                ids.append(index[id(p)])
            state = {}
            for j, p in enumerate(group["params"]):
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    state[j] = {"momentum_buffer": buf.clone()}
            self._group_to_param_list.append(ids)
            self.state.append(state)
            self.param_groups.append({k: v for k, v in group.items() if k != "params"})
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads
        self._grad_callback = grad_callback
        self._steps = 0
        self._context = "this innerloop_ctx"  # innerloop_ctx names it
        if override is not None:
            self._apply_override(override)

    def _apply_override(self, override: Dict) -> None:
        for k, v in override.items():
            if not isinstance(v, (list, tuple)):
                v = [v]
            if len(v) == 1:
                v = list(v) * len(self.param_groups)
            if len(v) != len(self.param_groups):
                raise ValueError(f"override[{k!r}] must have 1 or {len(self.param_groups)} entries, got {len(v)}")
            for group, value in zip(self.param_groups, v):
                group[k] = value

    def step(self, loss: Tensor, params: Optional[Sequence[Tensor]] = None, override: Optional[Dict] = None,
             grad_callback=None) -> List[Tensor]:
        if override is not None:
            self._apply_override(override)
        self._steps += 1
        check_loss(_NAME, loss, f"diffopt.step() call {self._steps} of {self._context}", _CONSEQUENCE)
        params = list(self._fmodel.fast_params if params is None else params)
        targets = [p if p.requires_grad else torch.tensor([], requires_grad=True) for p in params]
        grads = list(torch.autograd.grad(loss, targets, create_graph=self._track_higher_grads, allow_unused=True))
        callback = grad_callback or self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
        new = list(params)
        for gi, (group, mapping) in enumerate(zip(self.param_groups, self._group_to_param_list)):
            wd, momentum = group["weight_decay"], group["momentum"]
            dampening, nesterov, lr = group["dampening"], group["nesterov"], group["lr"]
            for j, i in enumerate(mapping):
                p, g = params[i], grads[i]
                if g is None:
                    continue
                if wd != 0:
                    g = g + wd * p
                if momentum != 0:
                    st = self.state[gi].setdefault(j, {})
                    if "momentum_buffer" not in st:
                        buf = st["momentum_buffer"] = g
                    else:
                        buf = st["momentum_buffer"] = st["momentum_buffer"].mul(momentum) + (1 - dampening) * g
                    g = g + momentum * buf if nesterov else buf
                p = p + (-lr) * g
                new[i] = p if self._track_higher_grads else p.detach().requires_grad_()
        self._fmodel.update_params(new)
        return new


@contextlib.contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, device: Optional[torch.device] = None,
                  copy_initial_weights: bool = True, override: Optional[Dict] = None,
                  track_higher_grads: bool = True):
    """Yields ``(fmodel, diffopt)`` as higher's ``innerloop_ctx`` does (SGD only)."""
    check_module(f"{_NAME}.innerloop_ctx", "model", model)
    if type(opt) is not torch.optim.SGD:
        raise NotImplementedError(
            f"fastmaml.compat.higher supports {SUPPORTED}, got {type(opt).__module__}.{type(opt).__name__}; "
            "use higher itself for other optimizers, or write the inner step with fastmaml.MAML")
    fmodel = FunctionalModule(model, copy_initial_weights, track_higher_grads, device)
    diffopt = DifferentiableSGD(opt, fmodel, track_higher_grads, override)
    n = _CONTEXTS.setdefault(model, CallCounter()).next(fmodel._slots.params)
    diffopt._context = f"innerloop_ctx #{n} (innerloop_ctx call {n} on this model since its parameters last changed)"
    yield fmodel, diffopt
