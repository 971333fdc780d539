"""higher 0.2's ``innerloop_ctx`` for ``torch.optim.SGD``, on cheaper bookkeeping: change the import.

    # import higher
    from fastmaml.compat import higher
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1, momentum=0.9)
    with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
        for _ in range(K):
            diffopt.step(F.cross_entropy(fnet(x_s), y_s))
        F.cross_entropy(fnet(x_q), y_q).backward()   # the same gradients as higher's

Semantics of higher 0.2.1: the fast weights start as copies of the model's parameters, detached
(``copy_initial_weights=True``: gradients stop there, reach ``fnet.parameters(time=0)``) or connected
(``False``, the MAML setting: gradients reach the model's parameters). ``diffopt.step(loss)`` is one
step of the optimizer's SGD rule (per parameter group: lr, momentum, dampening, weight_decay, nesterov;
momentum buffers start from the optimizer's state), differentiable when ``track_higher_grads``.
Buffers (BatchNorm's running statistics) are copies, updated without touching the model's.

Only ``torch.optim.SGD`` is supported: any other optimizer (or ``maximize=True``) raises an error
that names what is supported. ``override={'lr': [...]}`` works as in higher (tensors allowed).

What fastmaml adds: ``diffopt.step`` refuses a NaN or infinite loss with a FloatingPointError naming
the call (which step of which ``innerloop_ctx``) instead of turning every ``.grad`` into NaN. Every
other name (``higher.patch``, ``higher.optim``, ``higher.monkeypatch``, ``higher.get_diff_optim``, ...)
is the installed higher's own, so a higher script runs unchanged; without higher those names raise an
ImportError saying so, and ``innerloop_ctx`` keeps working.
"""

# Only higher's names live here (the implementation is in _higher_impl): any other global would hide
# higher's attribute of that name from the pass-through below.
from . import _passthrough
from ._higher_impl import SUPPORTED, DifferentiableSGD, FunctionalModule, innerloop_ctx

__all__ = ["innerloop_ctx", "FunctionalModule", "DifferentiableSGD", "SUPPORTED"]

# every other name (patch, optim, monkeypatch, get_diff_optim, ...) is higher's
__getattr__ = _passthrough.make_getattr(__name__, "higher", "pip install higher==0.2.1", __all__)
__dir__ = _passthrough.make_dir(globals(), "higher")
