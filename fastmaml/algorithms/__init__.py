"""The rest of the MAML family on fastmaml's task-batched engine (issue 14).

* :class:`ANIL` (Raghu et al., ICLR 2020, "Rapid learning or feature reuse?"): the body runs once per
  task and set, only the head adapts; the meta-gradient still reaches the body through the head's
  inner loop.
* :class:`Reptile` (Nichol, Achiam & Schulman 2018, "On first-order meta-learning algorithms"):
  all T tasks' inner SGD as one [T, P] computation; batched and serial variants.
* :class:`IMAML` (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, "Meta-learning with implicit
  gradients"): proximal inner loop, implicit meta-gradient by one batched conjugate gradient.
* :mod:`.mamlpp` (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML"): the schedules of
  MAML++ (derivative-order annealing, cosine meta learning rate, multi-step loss annealing).

Each is an ``nn.Module`` whose ``meta_step(support_x, support_y, query_x, query_y)`` adds the
meta-gradient (or, for Reptile, the meta-update direction) to ``.grad`` like ``MAML.meta_step``, and
whose ``adapt`` / ``predict`` / ``evaluate`` work like MAML's.
"""

from .anil import ANIL
from .imaml import IMAML
from .mamlpp import MAMLPPSchedule
from .reptile import Reptile

__all__ = ["ANIL", "Reptile", "IMAML", "MAMLPPSchedule"]
