"""TorchOpt 0.7's MAML pattern (``MetaSGD`` + ``extract_state_dict`` / ``recover_state_dict``) on
cheaper bookkeeping: change the import.

    # import torchopt
    from fastmaml.compat import torchopt
    inner_opt = torchopt.MetaSGD(net, lr=0.1)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    for i in range(T):
        for _ in range(K):
            inner_opt.step(F.cross_entropy(net(x_s[i]), y_s[i]))   # net now holds the fast weights
        losses.append(F.cross_entropy(net(x_q[i]), y_q[i]))
        torchopt.recover_state_dict(net, net_state)                 # the meta-parameters back in place
        torchopt.recover_state_dict(inner_opt, opt_state)
    torch.stack(losses).mean().backward()                           # the same gradients as TorchOpt's

Semantics of TorchOpt 0.7.3 (tested against it in float64):

* ``MetaSGD(module, lr, momentum=0, weight_decay=0, dampening=0, nesterov=False,
  moment_requires_grad=True, maximize=False)``: ``step(loss)`` differentiates ``loss`` with respect to
  the tensors now in the module's parameter slots (``create_graph=True``, unused ones keep their
  value), applies TorchOpt's SGD rule with the same tensor operations (weight decay ``g + wd * p``,
  ``maximize`` negates, momentum trace ``t * momentum + (1 - dampening) * g``, Nesterov
  ``g + momentum * t``, then ``p + g * (-lr)``), and writes the new tensors into the slots (plain
  tensors, not ``nn.Parameter``s: ``net.parameters()`` then yields the fast weights). Momentum traces
  start at zeros (``requires_grad=moment_requires_grad``). As in TorchOpt, the first update a
  ``MetaSGD`` ever makes adds the gradient to the trace undampened and every later one dampens, even
  after its state was reset by ``recover_state_dict``.
* ``extract_state_dict(module, by=..., device=None, with_buffers=True, detach_buffers=False,
  enable_visual=False, visual_prefix="")`` returns a ``ModuleState(params, buffers, visual_contents,
  detach_buffers)`` holding, per submodule with parameters (buffers), a dict of its slots; ``by``:
  ``"reference"`` / ``"ref"`` (the tensors themselves), ``"copy"`` / ``"clone"`` (clones, connected to
  the graph), ``"deepcopy"`` / ``"deepclone"`` (detached copies); ``detach_buffers=True`` stores detached
  copies of the buffers and ``recover_state_dict`` puts fresh detached copies back (BatchNorm's running
  statistics do not carry over from task to task). ``extract_state_dict(meta_sgd, by=..., device=None)``
  returns its per-group states, ``recover_state_dict`` loads them (a state extracted before the first
  step restarts the traces at zero).

What fastmaml adds: bad arguments fail when the optimizer is made (``lr="0.1"``: a TypeError naming
``lr``; an lr schedule, a callable, raises NotImplementedError), and ``step`` refuses a NaN or infinite
loss with a FloatingPointError naming the call instead of turning every ``.grad`` into NaN.

What differs: no ``optree`` flattening and no chain of gradient transformations per step; the update is
a loop over the slots. ``MetaSGD`` is not a ``torchopt.MetaOptimizer``: it has ``step``,
``add_param_group``, ``state_dict``, ``load_state_dict``, ``param_containers_groups`` and
``state_groups``, not ``impl``. ``stop_gradient`` knows it; ``module_clone`` and ``module_detach_`` of it
raise NotImplementedError (TorchOpt's own would treat it as an opaque object). Every other name
(``MetaAdam``, ``MetaOptimizer``, ``sgd``, ``adam``, ``apply_updates``, ``visual``, ...) is the installed
TorchOpt's own, so a TorchOpt script runs unchanged; ``extract_state_dict`` / ``recover_state_dict`` hand
TorchOpt's own meta-optimizers to TorchOpt. Without TorchOpt those names raise an ImportError saying so.
"""

# Only TorchOpt's names live here (the implementation is in _torchopt_impl): any other global, say
# torch's ``nn``, would hide TorchOpt's ``torchopt.nn`` from the pass-through below.
from . import _passthrough
from ._torchopt_impl import INSTALL as _INSTALL
from ._torchopt_impl import (MetaSGD, ModuleState, extract_state_dict, module_clone, module_detach_,
                             recover_state_dict, stop_gradient)

__all__ = ["MetaSGD", "ModuleState", "extract_state_dict", "recover_state_dict", "stop_gradient",
           "module_clone", "module_detach_"]
MetaSGD.__module__ = ModuleState.__module__ = __name__   # where users import them from (reprs, pickles)

# every other name (MetaAdam, MetaOptimizer, sgd, adam, apply_updates, visual, nn, ...) is TorchOpt's
__getattr__ = _passthrough.make_getattr(__name__, "torchopt", _INSTALL, __all__)
__dir__ = _passthrough.make_dir(globals(), "torchopt")
