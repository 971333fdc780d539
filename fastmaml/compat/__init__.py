"""Drop-in layers for code written against other MAML libraries (issue 11).

* :mod:`fastmaml.compat.learn2learn`: ``MAML`` and ``MetaSGD`` with learn2learn 0.2's API
  (``clone()``, ``adapt(loss)``, calling the learner).
* :mod:`fastmaml.compat.higher`: ``innerloop_ctx`` with higher 0.2's API for ``torch.optim.SGD``.

They keep the libraries' per-task semantics (same meta-gradients) with cheaper bookkeeping: fast
weights are a list of tensors swapped into the module for one call, no module is copied. For the
task-batched speed-up, port the per-task loop to ``fastmaml.MAML.adapt(..., create_graph=True)``
(docs/porting.md).
"""

from . import higher, learn2learn

__all__ = ["higher", "learn2learn"]
