"""The implementation of :mod:`fastmaml.compat.torchopt` (documented there); kept apart so that the
public module's namespace holds only TorchOpt's names (a global ``nn`` there would hide ``torchopt.nn``)."""


from __future__ import annotations

import importlib
import itertools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import CallCounter, check_flag, check_loss, check_module, check_rate
from ._passthrough import import_library

__all__ = ["MetaSGD", "ModuleState", "extract_state_dict", "recover_state_dict", "stop_gradient",
           "module_clone", "module_detach_"]

_NAME = "fastmaml.compat.torchopt"
INSTALL = "pip install torchopt==0.7.3"
_CONSEQUENCE = "TorchOpt would take the step and turn every .grad into NaN"

Containers = Tuple[Dict[str, Optional[Tensor]], ...]   # a module's _parameters (or _buffers) dicts, in order
GroupState = Optional[Tuple[Optional[Tensor], ...]]    # None: not initialized; else one trace per slot


class ModuleState(NamedTuple):
    """What ``extract_state_dict(module)`` returns (TorchOpt's field names and order)."""

    params: Tuple[Dict[str, Tensor], ...]
    buffers: Tuple[Dict[str, Tensor], ...]
    visual_contents: Optional[dict] = None
    detach_buffers: bool = False


def _module_containers(module: nn.Module, with_buffers: bool = True) -> Tuple[Containers, Containers]:
    """References to the module's non-empty ``_parameters`` (and ``_buffers``) dicts, the module first,
    then each submodule once in ``modules()`` order (TorchOpt's order)."""
    params: List[Dict] = []
    buffers: List[Dict] = []
    for m in module.modules():   # modules() visits each submodule once, the module itself first
        if len(m._parameters) > 0:
            params.append(m._parameters)
        if with_buffers and len(m._buffers) > 0:
            buffers.append(m._buffers)
    return tuple(params), tuple(buffers)


# -- the meta-optimizer ------------------------------------------------------------------------------
class MetaSGD:
    """TorchOpt's ``MetaSGD``: differentiable SGD that updates the module's parameter slots in place."""

    def __init__(self, module: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, moment_requires_grad: bool = True,
                 maximize: bool = False) -> None:
        owner = f"{_NAME}.MetaSGD"
        check_module(owner, "module", module)
        if callable(lr) and not isinstance(lr, Tensor):
            raise NotImplementedError(f"{owner}: lr as a schedule (a callable) is not supported, got {lr!r}; "
                                      "pass a number, or use torchopt.MetaSGD itself")
        self.lr = check_rate(owner, "lr", lr)
        self.momentum = float(check_rate(owner, "momentum", momentum))
        self.weight_decay = float(check_rate(owner, "weight_decay", weight_decay))
        self.dampening = float(check_rate(owner, "dampening", dampening))
        for name, v in (("lr", self.lr), ("momentum", self.momentum), ("weight_decay", self.weight_decay)):
            if bool(torch.as_tensor(v).lt(0).any()):
                raise ValueError(f"{owner}: {name} must be >= 0, got {v!r}")
        self.nesterov = check_flag(owner, "nesterov", nesterov)
        self.moment_requires_grad = check_flag(owner, "moment_requires_grad", moment_requires_grad)
        self.maximize = check_flag(owner, "maximize", maximize)
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={self.momentum}, dampening={self.dampening}")
        self.param_containers_groups: List[Containers] = []
        self.state_groups: List[GroupState] = []
        # TorchOpt's trace keeps one "first call" flag per optimizer, not per state (see the module doc)
        self._first_trace_update = True
        self._tasks = CallCounter()   # inner loops started from the module's own parameters
        self._task, self._steps = 0, 0
        self.add_param_group(module)

    def add_param_group(self, module: nn.Module) -> None:
        check_module(f"{_NAME}.MetaSGD.add_param_group", "module", module)
        self.param_containers_groups.append(_module_containers(module, with_buffers=False)[0])
        self.state_groups.append(None)

    def state_dict(self) -> Tuple[GroupState, ...]:
        """The per-group states themselves (references, as in TorchOpt)."""
        return tuple(self.state_groups)

    def load_state_dict(self, state_dict: Sequence[GroupState]) -> None:
        if len(state_dict) != len(self.state_groups):
            raise ValueError(f"{_NAME}.MetaSGD.load_state_dict: {len(self.state_groups)} parameter group(s), "
                             f"got a state of {len(state_dict)}")
        self.state_groups[:] = list(state_dict)

    def _slots(self, group: int) -> List[Tuple[Dict, str]]:
        return [(c, k) for c in self.param_containers_groups[group] for k, v in c.items() if v is not None]

    def _where(self) -> str:
        slots = [c[k] for g in range(len(self.param_containers_groups)) for c, k in self._slots(g)]
        if all(isinstance(p, nn.Parameter) for p in slots):   # a new inner loop from the meta-parameters
            self._task, self._steps = self._tasks.next(slots), 0
        self._steps += 1
        return (f"MetaSGD.step() call {self._steps} of task {self._task} (steps since the module's own "
                "parameters were in place; tasks since those last changed)")

    def step(self, loss: Tensor) -> None:
        """One differentiable SGD step of every group on ``loss``; the module's slots get the results."""
        check_loss(_NAME, loss, self._where(), _CONSEQUENCE)
        for i in range(len(self.param_containers_groups)):
            slots = self._slots(i)
            params = [c[k] for c, k in slots]
            state = self.state_groups[i]
            if state is None:
                state = self._init(params)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            new, self.state_groups[i] = self._update(params, grads, state)
            for (c, k), p in zip(slots, new):
                c[k] = p

    def _init(self, params: List[Tensor]) -> Tuple[Optional[Tensor], ...]:
        if self.momentum == 0.0:
            return ()
        return tuple(torch.zeros_like(p, requires_grad=self.moment_requires_grad) for p in params)

    def _update(self, params: List[Tensor], grads, trace) -> Tuple[List[Tensor], Tuple]:
        """TorchOpt's SGD chain (flip sign / weight decay, trace, scale by -lr, add), op for op, so that
        the gradients through it match TorchOpt's to the last bit."""
        wd, mom, damp, lr = self.weight_decay, self.momentum, self.dampening, self.lr
        first = self._first_trace_update
        new_params: List[Tensor] = []
        new_trace: List[Optional[Tensor]] = list(trace)
        for j, (p, g) in enumerate(zip(params, grads)):
            if g is None:   # unused by the loss: the slot keeps its tensor (TorchOpt: allow_unused)
                new_params.append(p)
                continue
            if self.maximize:
                g = g.neg() if wd == 0.0 else g.neg().add_(p, alpha=wd)
            elif wd != 0.0:
                g = g.add(p, alpha=wd)
            if mom != 0.0:
                t = trace[j]
                if self.nesterov:
                    t = t.add(g) if first else t.mul(mom).add_(g)
                    g = g.add(t, alpha=mom)
                else:
                    t = t.add(g) if first else t.mul(mom).add_(g, alpha=1.0 - damp)
                    g = t.clone()
                new_trace[j] = t
            new_params.append(p.add(g.mul(-lr)))
        if mom != 0.0:
            self._first_trace_update = False
        return new_params, tuple(new_trace)

    def __repr__(self) -> str:
        return (f"{_NAME}.MetaSGD(lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}, "
                f"dampening={self.dampening}, nesterov={self.nesterov}, maximize={self.maximize})")


# -- state extraction ------------------------------------------------------------------------------
_BY = ("reference", "copy", "deepcopy", "ref", "clone", "deepclone")


def _replicators(by: str, device) -> Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(how ``by`` copies a tensor, the detached copy that ``detach_buffers`` uses), onto ``device``."""
    if by not in _BY:
        raise ValueError(f"{_NAME}.extract_state_dict: by must be one of {', '.join(map(repr, _BY))}, got {by!r}")
    by = {"ref": "reference", "clone": "copy", "deepclone": "deepcopy"}.get(by, by)
    dev = torch.device(device) if device is not None else None

    def move(t: Tensor) -> Tensor:
        return t if dev is None else t.to(device=dev)

    def detached(t: Tensor) -> Tensor:
        if isinstance(t, nn.Parameter):
            return nn.Parameter(move(t.clone()).detach_(), requires_grad=t.requires_grad)
        return move(t.clone()).detach_().requires_grad_(t.requires_grad)

    if by == "reference":
        return move, detached
    if by == "copy":
        return (lambda t: move(t.clone())), detached
    return detached, detached


def _torchopt_meta_optimizer(target) -> bool:
    """Whether ``target`` is one of the installed TorchOpt's own meta-optimizers (then TorchOpt handles it)."""
    mod = type(target).__module__
    if not mod.startswith("torchopt"):
        return False
    return isinstance(target, importlib.import_module("torchopt").MetaOptimizer)


def extract_state_dict(target: Union[nn.Module, MetaSGD], *, by: str = "reference", device=None,
                       with_buffers: bool = True, detach_buffers: bool = False, enable_visual: bool = False,
                       visual_prefix: str = "") -> Union[ModuleState, Tuple[GroupState, ...]]:
    """TorchOpt's ``extract_state_dict`` (module doc): a ``ModuleState`` of a module, the per-group states
    of a ``MetaSGD``."""
    owner = f"{_NAME}.extract_state_dict"
    replicate, detached = _replicators(by, device)
    if isinstance(target, MetaSGD):
        return tuple(None if s is None else tuple(t if t is None else replicate(t) for t in s)
                     for s in target.state_dict())
    if isinstance(target, nn.Module):
        check_flag(owner, "with_buffers", with_buffers)
        check_flag(owner, "detach_buffers", detach_buffers)
        check_flag(owner, "enable_visual", enable_visual)
        visual = None
        if enable_visual:   # what torchopt.visual.make_dot reads: grad_fn (or leaf) -> name
            visual = {}
            for k, v in target.named_parameters():
                if v.grad_fn is not None:
                    visual[v.grad_fn] = (visual_prefix + k, v)
                else:
                    visual[v] = visual_prefix + k
        param_dicts, buffer_dicts = _module_containers(target, with_buffers)
        buffer_copy = detached if detach_buffers else replicate
        params = tuple(type(c)((k, replicate(v)) for k, v in c.items() if isinstance(v, Tensor))
                       for c in param_dicts)
        buffers = tuple(type(c)((k, buffer_copy(v)) for k, v in c.items() if isinstance(v, Tensor))
                        for c in buffer_dicts)
        return ModuleState(params=params, buffers=buffers, visual_contents=visual, detach_buffers=detach_buffers)
    if _torchopt_meta_optimizer(target):
        return importlib.import_module("torchopt").extract_state_dict(target, by=by, device=device)
    raise TypeError(f"{owner}: target must be a torch.nn.Module or a MetaSGD, got {type(target).__name__}")


def recover_state_dict(target: Union[nn.Module, MetaSGD], state) -> None:
    """TorchOpt's ``recover_state_dict``: the extracted tensors back into the module's slots (fresh detached
    copies of the buffers if they were extracted with ``detach_buffers=True``), or the states into the
    optimizer."""
    owner = f"{_NAME}.recover_state_dict"
    if isinstance(target, MetaSGD):
        target.load_state_dict(state)
        return
    if isinstance(target, nn.Module):
        if not (isinstance(state, tuple) and hasattr(state, "params") and hasattr(state, "buffers")):
            raise TypeError(f"{owner}: state for a module must be what extract_state_dict(module) returned "
                            f"(a ModuleState), got {type(state).__name__}")
        param_dicts, buffer_dicts = _module_containers(target, with_buffers=True)
        if len(state.params) != len(param_dicts):
            raise ValueError(f"{owner}: the state holds {len(state.params)} parameter container(s), the module "
                             f"{len(param_dicts)}: it was extracted from another module")
        buffers = state.buffers
        if getattr(state, "detach_buffers", False):
            detached = _replicators("deepcopy", None)[0]
            buffers = tuple(type(c)((k, detached(v)) for k, v in c.items()) for c in buffers)
        for tgt, src in itertools.chain(zip(param_dicts, state.params), zip(buffer_dicts, buffers)):
            tgt.update(src)
        return
    if _torchopt_meta_optimizer(target):
        importlib.import_module("torchopt").recover_state_dict(target, state)
        return
    raise TypeError(f"{owner}: target must be a torch.nn.Module or a MetaSGD, got {type(target).__name__}")


def stop_gradient(target) -> None:
    """TorchOpt's ``stop_gradient``: detach in place (keeping ``requires_grad``) a ``ModuleState``'s tensors,
    a module's parameters or a ``MetaSGD``'s state; any other tree of tensors goes to TorchOpt's."""
    if isinstance(target, ModuleState):
        tensors: List[Any] = [v for d in itertools.chain(target.params, target.buffers) for v in d.values()]
    elif isinstance(target, nn.Module):
        tensors = list(target.parameters())
    elif isinstance(target, MetaSGD):
        tensors = [t for s in target.state_dict() if s is not None for t in s]
    else:
        import_library("torchopt", _NAME, "stop_gradient", INSTALL, __all__).stop_gradient(target)
        return
    for t in tensors:
        if isinstance(t, Tensor):
            requires_grad = t.requires_grad   # read before detach_() clears it
            t.detach_().requires_grad_(requires_grad)


def _not_for_metasgd(name: str) -> Callable[..., Any]:
    def fn(target, *args, **kwargs):
        if isinstance(target, MetaSGD):
            raise NotImplementedError(f"{_NAME}.{name} of a fastmaml.compat.torchopt.MetaSGD is not supported "
                                      "(TorchOpt's would treat it as an opaque object); make a new MetaSGD instead")
        return getattr(import_library("torchopt", _NAME, name, INSTALL, __all__), name)(target, *args, **kwargs)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"TorchOpt's ``{name}`` (from the installed TorchOpt); not for this module's ``MetaSGD``."
    return fn


module_clone = _not_for_metasgd("module_clone")
module_detach_ = _not_for_metasgd("module_detach_")
