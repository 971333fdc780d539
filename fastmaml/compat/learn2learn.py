"""learn2learn 0.2's ``MAML`` and ``MetaSGD`` on cheaper bookkeeping: change the import.

    # import learn2learn as l2l; maml = l2l.algorithms.MAML(model, lr=0.5)
    from fastmaml.compat import learn2learn as l2l
    maml = l2l.MAML(model, lr=0.5)           # also l2l.algorithms.MAML
    learner = maml.clone()
    learner.adapt(loss_fn(learner(x_s), y_s))
    loss_fn(learner(x_q), y_q).backward()    # the same meta-gradient as learn2learn's

Same semantics as learn2learn 0.2: ``clone(first_order=None, allow_unused=None, allow_nograd=None)``
gives a learner whose fast weights start at the model's parameters (connected to them);
``adapt(loss, first_order=None, allow_unused=None, allow_nograd=None)`` takes one SGD step
``p <- p - lr * grad`` (``create_graph`` unless first order); calling the learner runs the model with
its fast weights; ``.module`` is the model; ``MAML.parameters()`` are the model's own (``MetaSGD``'s
add the per-parameter rates ``lrs``). Running statistics of BatchNorm are the model's buffers, updated
in place in training mode, as learn2learn's clones do (they share the buffers).

What differs: learn2learn copies the module tree at every ``clone()`` and rebuilds it at every
``adapt``; here a clone is a list of tensors swapped into the model for the duration of one call
(nothing is copied). A clone's ``.module`` is the model itself (not a copy holding the fast weights):
call the clone, not ``clone.module``, to use the fast weights; a clone's ``parameters()`` are its
fast weights, as in learn2learn.

What fastmaml adds: bad arguments fail when the learner is made (``MAML(model, lr="0.01")`` raises a
TypeError naming ``lr``), and ``adapt()`` refuses a NaN or infinite loss with a FloatingPointError
naming the call (which ``adapt()`` of which clone) instead of turning every ``.grad`` into NaN.

Every other name a learn2learn script uses (``vision``, ``data``, ``nn``, ``utils``, ``optim``,
``clone_module``, ``algorithms.GBML``, ...) is the installed learn2learn's own object, so
``import fastmaml.compat.learn2learn as l2l`` runs learn2learn's published examples unchanged; without
learn2learn these names raise an ImportError saying so, and ``MAML``, ``MetaSGD``, ``algorithms.MAML``
and ``algorithms.MetaSGD`` keep working.
"""

# Only learn2learn's names live here (the implementation is in _learn2learn_impl): any other global,
# say torch's ``nn``, would hide learn2learn's ``l2l.nn`` from the pass-through below.
from . import _passthrough
from ._learn2learn_impl import INSTALL as _INSTALL
from ._learn2learn_impl import MAML, MetaSGD

__all__ = ["MAML", "MetaSGD", "algorithms"]
MAML.__module__ = MetaSGD.__module__ = __name__   # where users import them from (reprs, pickles)

# learn2learn scripts write ``l2l.algorithms.MAML``: our MAML and MetaSGD there, learn2learn's other
# algorithms (GBML, LightningMAML, maml_update, ...) beside them
algorithms = _passthrough.namespace(f"{__name__}.algorithms", "learn2learn.algorithms", _INSTALL,
                                    {"MAML": MAML, "MetaSGD": MetaSGD})

# every other name (vision, data, nn, utils, optim, clone_module, ...) is learn2learn's
__getattr__ = _passthrough.make_getattr(__name__, "learn2learn", _INSTALL,
                                        ("MAML", "MetaSGD", "algorithms.MAML", "algorithms.MetaSGD"))
__dir__ = _passthrough.make_dir(globals(), "learn2learn")
