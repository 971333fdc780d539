"""Drop-in layers for code written against other MAML libraries (issue 11, issue 24).

* :mod:`fastmaml.compat.learn2learn`: ``MAML`` and ``MetaSGD`` with learn2learn 0.2's API
  (``clone()``, ``adapt(loss)``, calling the learner).
* :mod:`fastmaml.compat.higher`: ``innerloop_ctx`` with higher 0.2's API for ``torch.optim.SGD``.
* :mod:`fastmaml.compat.torchopt`: ``MetaSGD``, ``extract_state_dict`` and ``recover_state_dict`` with
  TorchOpt 0.7's API.

They keep the libraries' per-task semantics (same meta-gradients) with cheaper bookkeeping: fast
weights are a list of tensors swapped into the module for one call (learn2learn, higher) or written
into its slots without pytree machinery (TorchOpt), no module is copied. Every name a script takes
from the library that fastmaml does not accelerate (``l2l.vision``, ``higher.patch``,
``torchopt.MetaAdam``, ...) is the installed library's own, so a published script runs with only its
import changed. For the task-batched speed-up, port the per-task loop to
``fastmaml.MAML.adapt(..., create_graph=True)`` (docs/porting.md).
"""

from . import higher, learn2learn, torchopt

__all__ = ["higher", "learn2learn", "torchopt"]
