"""Comparison implementations of ONE task-batched MAML meta-step.

Every baseline is built by a factory with one signature::

    step = make_<name>(model, inner_lr, inner_steps, first_order)
    loss = step(support_x, support_y, query_x, query_y)

and computes the same thing:

* a batch of T tasks; ``support_x``: (T, Ns, *in_shape), ``support_y``: (T, Ns[, ...]),
  ``query_x``: (T, Nq, *in_shape), ``query_y``: (T, Nq[, ...]);
* per task: ``inner_steps`` steps of plain SGD with the scalar ``inner_lr``,
  adapting ALL parameters of ``model``, on the support loss;
* meta-loss = mean over tasks of the query loss of the adapted parameters;
* the loss is cross-entropy when the labels are integer, MSE (mean) when they
  are floating point;
* BatchNorm: the models of ``bench/models.py`` use
  ``BatchNorm2d(track_running_stats=False)``, i.e. per-task batch statistics
  (separately for every support and query forward pass), no running buffers;
* second-order MAML unless ``first_order`` (then FOMAML: the inner gradients
  are treated as constants, so the meta-gradient is dL_query/dtheta_K summed
  over tasks / T).

``step`` sets ``p.grad`` of every parameter of ``model`` to the meta-gradient
(previous ``.grad`` values are discarded, not accumulated) and returns the
detached meta-loss.  The model's parameters themselves are not changed: the
caller owns the meta-optimizer.

Baselines (each import is guarded; see :func:`available`):

``learn2learn``  ``l2l.algorithms.MAML`` (clone / adapt), per-task backward.
``higher``       ``higher.innerloop_ctx`` with ``torch.optim.SGD``,
                 ``copy_initial_weights=False``, per-task backward.
``torchopt``     second order: TorchOpt's documented MAML recipe
                 (``torchopt.MetaSGD`` + ``extract_state_dict`` /
                 ``recover_state_dict``, stacked query losses, one backward);
                 first order: TorchOpt's functional API (``torchopt.sgd`` +
                 ``apply_updates``), because ``MetaSGD.step`` always builds the
                 second-order graph (``create_graph=True``).
``torch_func``   ``torch.func``: ``vmap`` over tasks of (K x ``grad`` +
                 ``functional_call``, then the query loss), ``grad_and_value``
                 of the mean for the meta-gradient.  NOTE: with BatchNorm its
                 second-order gradient is wrong (PyTorch vmap bug, see
                 :func:`make_torch_func`).
``torch_func_bnfix``  (variant, in ``VARIANTS``) the same code run on a copy of
                 the model whose BatchNorm is written with elementary ops;
                 correct.

learn2learn 0.2.0 imports ``torchvision`` (and ``gym``, ``scipy``, ``PIL``,
``requests``, ``tqdm``) at import time.  Only ``torchvision`` is missing in the
bench venv (no torchvision wheel works beside the CPU torch pin), so
:func:`import_learn2learn` injects a throw-away stub ``torchvision`` package for
the duration of ``import learn2learn`` only and removes it from
``sys.modules`` afterwards.  The stub's attributes are placeholder classes that
raise if instantiated; nothing used by ``l2l.algorithms.MAML`` touches them.
When a working torchvision is installed the real one is used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import sys
import types
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BASELINES",
    "VARIANTS",
    "available",
    "import_learn2learn",
    "make",
    "make_higher",
    "make_learn2learn",
    "make_torch_func",
    "make_torchopt",
    "task_loss",
]

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------
def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, mean-squared error for float targets."""
    if y.is_floating_point():
        return F.mse_loss(out, y)
    return F.cross_entropy(out, y)


def _clear_grads(params) -> None:
    for p in params:
        p.grad = None


def _add_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())


# ---------------------------------------------------------------------------
# learn2learn import (with a temporary torchvision stub when needed)
# ---------------------------------------------------------------------------
class _Unavailable:
    """Placeholder for a torchvision object inside the stub: unusable."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__module__}.{type(self).__name__}: torchvision is not "
            "installed; this is the bench harness's import-time stub"
        )


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(attr, (_Unavailable,), {"__module__": self.__name__})
        setattr(self, attr, cls)
        return cls


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and every ``torchvision.*`` as empty stub packages."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


def _purge_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _real_torchvision_ok() -> bool:
    if "torchvision" in sys.modules and not isinstance(sys.modules["torchvision"], _StubModule):
        return True
    try:
        if importlib.util.find_spec("torchvision") is None:
            return False
    except (ImportError, ValueError):
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # broken install (e.g. built for another torch)
        _purge_torchvision()
        return False


_L2L_NOTE = ""


def import_learn2learn():
    """Import learn2learn, with a temporary torchvision stub if torchvision is unusable."""
    global _L2L_NOTE
    if "learn2learn" in sys.modules:
        return sys.modules["learn2learn"]
    # gym (a hard import of learn2learn) prints a deprecation notice on import.
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            importlib.import_module("gym")
        except Exception:
            pass  # the learn2learn import below will report it
    if _real_torchvision_ok():
        _L2L_NOTE = "real torchvision"
        return importlib.import_module("learn2learn")
    finder = _TorchvisionStubFinder()
    sys.meta_path.insert(0, finder)
    try:
        l2l = importlib.import_module("learn2learn")
    finally:
        sys.meta_path.remove(finder)
        _purge_torchvision()
    _L2L_NOTE = "torchvision stubbed at import"
    return l2l


# ---------------------------------------------------------------------------
# learn2learn
# ---------------------------------------------------------------------------
def make_learn2learn(model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool) -> Step:
    l2l = import_learn2learn()
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    params = list(model.parameters())

    def step(support_x, support_y, query_x, query_y):
        _clear_grads(params)
        n_tasks = support_x.shape[0]
        total = 0.0
        for t in range(n_tasks):
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(task_loss(learner(support_x[t]), support_y[t]))
            loss = task_loss(learner(query_x[t]), query_y[t]) / n_tasks
            loss.backward()
            total = total + loss.detach()
        return total

    return step


# ---------------------------------------------------------------------------
# higher
# ---------------------------------------------------------------------------
def make_higher(model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool) -> Step:
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    params = list(model.parameters())

    def step(support_x, support_y, query_x, query_y):
        _clear_grads(params)
        n_tasks = support_x.shape[0]
        total = 0.0
        for t in range(n_tasks):
            with higher.innerloop_ctx(
                model,
                inner_opt,
                copy_initial_weights=False,
                track_higher_grads=not first_order,
            ) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(task_loss(fmodel(support_x[t]), support_y[t]))
                loss = task_loss(fmodel(query_x[t]), query_y[t]) / n_tasks
                if first_order and inner_steps > 0:
                    # track_higher_grads=False detaches the fast weights after each
                    # step, so the query gradient stops at theta_K: FOMAML adds
                    # dL/dtheta_K to the initial parameters' gradient.
                    _add_grads(params, torch.autograd.grad(loss, fmodel.fast_params))
                else:
                    loss.backward()
            total = total + loss.detach()
        return total

    return step


# ---------------------------------------------------------------------------
# TorchOpt
# ---------------------------------------------------------------------------
def make_torchopt(
    model: nn.Module,
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
    api: str = "auto",
) -> Step:
    """TorchOpt.  ``api``: "meta_sgd" (second order only), "functional", or "auto"."""
    import torchopt

    if api == "auto":
        api = "functional" if first_order else "meta_sgd"
    if api == "meta_sgd":
        if first_order:
            raise ValueError("torchopt.MetaSGD always differentiates through the inner step")
        return _make_torchopt_meta_sgd(torchopt, model, inner_lr, inner_steps)
    if api == "functional":
        return _make_torchopt_functional(torchopt, model, inner_lr, inner_steps, first_order)
    raise ValueError(f"unknown torchopt api {api!r}")


def _make_torchopt_meta_sgd(torchopt, model, inner_lr, inner_steps) -> Step:
    inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
    params = list(model.parameters())

    def step(support_x, support_y, query_x, query_y):
        _clear_grads(params)
        n_tasks = support_x.shape[0]
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        losses = []
        try:
            for t in range(n_tasks):
                for _ in range(inner_steps):
                    inner_opt.step(task_loss(model(support_x[t]), support_y[t]))
                losses.append(task_loss(model(query_x[t]), query_y[t]))
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
        finally:  # never leave non-leaf fast weights inside the model
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss.detach()

    return step


def _make_torchopt_functional(torchopt, model, inner_lr, inner_steps, first_order) -> Step:
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    opt = torchopt.sgd(lr=inner_lr)

    def forward(p, x):
        return functional_call(model, (dict(zip(names, p)), buffers), (x,))

    def step(support_x, support_y, query_x, query_y):
        _clear_grads(params)
        n_tasks = support_x.shape[0]
        total = 0.0
        for t in range(n_tasks):
            fast = tuple(params)
            state = opt.init(fast)
            for _ in range(inner_steps):
                inner = task_loss(forward(fast, support_x[t]), support_y[t])
                grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
                updates, state = opt.update(grads, state, params=fast, inplace=False)
                fast = torchopt.apply_updates(fast, updates, inplace=False)
            loss = task_loss(forward(fast, query_x[t]), query_y[t]) / n_tasks
            loss.backward()
            total = total + loss.detach()
        return total

    return step


# ---------------------------------------------------------------------------
# torch.func
# ---------------------------------------------------------------------------
class _DecomposedBatchNorm(nn.Module):
    """Training-mode BatchNorm without running stats, written with elementary ops.

    Same parameter names (``weight``, ``bias``) as ``nn.BatchNorm{1,2,3}d`` so
    ``functional_call`` dictionaries of the original model apply unchanged.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.track_running_stats:
            raise ValueError("torch_func needs BatchNorm with track_running_stats=False")
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


def _with_decomposed_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers are ``_DecomposedBatchNorm``."""
    shadow = copy.deepcopy(model)
    for name, mod in list(shadow.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(mod, child_name, _DecomposedBatchNorm(child))
    return shadow


def make_torch_func(
    model: nn.Module,
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
    bn: str = "native",
) -> Step:
    """vmap over tasks of (K x torch.func.grad, query loss); grad of the mean.

    Needs BatchNorm without running statistics (``track_running_stats=False``):
    under vmap the in-place running-stat update of a shared buffer fails.

    ``bn="native"`` (the usual way) runs the model's own ``F.batch_norm``.
    KNOWN PYTORCH BUG (seen with torch 2.13.0, CPU): the vmap batching rule of
    batch_norm's backward gives a WRONG second-order meta-gradient when both
    the BatchNorm input and its affine weight depend on the meta-parameters
    (any conv -> BN block): ~0.5-3 % relative error on the conv4 check, while
    first-order and the non-vmapped ``grad(grad(...))`` are right (cf.
    pytorch/functorch#534).  ``bn="decomposed"`` runs the same vmap code on a
    shadow copy of the model whose BatchNorm layers are written with
    elementary ops (mean/var/rsqrt); that gives the correct gradient.
    """
    from torch.func import functional_call, grad, grad_and_value, vmap

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    if bn == "decomposed":
        fmodel = _with_decomposed_batchnorm(model)
    elif bn == "native":
        fmodel = model
    else:
        raise ValueError(f"unknown bn mode {bn!r}")

    def loss_at(p, x, y):
        return task_loss(functional_call(fmodel, (p, buffers), (x,)), y)

    inner_grad = grad(loss_at)

    def adapted_query_loss(p, sx, sy, qx, qy):
        for _ in range(inner_steps):
            g = inner_grad(p, sx, sy)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - inner_lr * g[k] for k in p}
        return loss_at(p, qx, qy)

    per_task = vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0))

    def meta_loss(p, sx, sy, qx, qy):
        return per_task(p, sx, sy, qx, qy).mean()

    meta_grad_and_loss = grad_and_value(meta_loss)

    def step(support_x, support_y, query_x, query_y):
        p = {n: t.detach() for n, t in zip(names, params)}
        grads, loss = meta_grad_and_loss(p, support_x, support_y, query_x, query_y)
        for n, t in zip(names, params):
            t.grad = grads[n]
        return loss.detach()

    return step


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
BASELINES: Dict[str, Callable[..., Step]] = {
    "learn2learn": make_learn2learn,
    "higher": make_higher,
    "torchopt": make_torchopt,
    "torch_func": make_torch_func,
}

# Extra variants (not separate libraries): see make_torch_func's docstring.
VARIANTS: Dict[str, Callable[..., Step]] = {
    "torch_func_bnfix": functools.partial(make_torch_func, bn="decomposed"),
}


def _probe(name: str) -> Union[bool, str]:
    try:
        if name == "learn2learn":
            l2l = import_learn2learn()
            l2l.algorithms.MAML  # noqa: B018
        elif name == "higher":
            import higher

            higher.innerloop_ctx  # noqa: B018
        elif name == "torchopt":
            import torchopt

            torchopt.MetaSGD  # noqa: B018
        elif name in ("torch_func", "torch_func_bnfix"):
            from torch.func import functional_call, grad, vmap  # noqa: F401
        else:
            return "unknown baseline"
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return True


def available() -> Dict[str, Union[bool, str]]:
    """name -> True, or a string saying why that baseline cannot run here."""
    return {name: _probe(name) for name in (*BASELINES, *VARIANTS)}


def versions() -> Dict[str, str]:
    """Installed versions of torch and of the comparison libraries (best effort)."""
    from importlib import metadata

    out = {}
    for dist in ("torch", "learn2learn", "higher", "torchopt", "optree", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if _L2L_NOTE:
        out["learn2learn"] += f" ({_L2L_NOTE})"
    return out


def make(name: str, model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool) -> Step:
    factory = BASELINES.get(name) or VARIANTS[name]
    return factory(model, inner_lr, inner_steps, first_order)
