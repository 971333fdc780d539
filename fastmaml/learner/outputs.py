"""What the learner's calls return: :class:`MetaStepOutput` and :class:`FastWeights`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from torch import Tensor

from ..layout import FlatLayout


@dataclass
class MetaStepOutput:
    """What one meta-step measured (all detached).

    loss: the meta-objective J (mean over tasks of the weighted query losses), 0-d.
    task_losses: [T] query loss of each task after the inner steps.
    task_accuracy: [T] query accuracy after the inner steps (classification), else None.
    """

    loss: Tensor
    task_losses: Tensor
    task_accuracy: Optional[Tensor]


@dataclass
class FastWeights:
    """The adapted parameters of T tasks: ``flat`` [T, P], in the learner's layout.

    ``learner`` identifies the MAML learner whose ``adapt`` made them (with its parameter layout),
    ``example_shape`` the shape of one support example: ``predict`` refuses fast weights of another
    learner and inputs of another shape.
    """

    flat: Tensor
    support_losses: Tensor  # [K, T]
    learner: Optional[object] = field(default=None, repr=False, compare=False)
    layout: Optional[FlatLayout] = field(default=None, repr=False, compare=False)
    example_shape: Optional[Tuple[int, ...]] = None

    @property
    def num_tasks(self) -> int:
        return self.flat.shape[0]


class LearnerIdentity:
    """A token that tells this learner's FastWeights from another's (a copy of a learner gets its own)."""

    __slots__ = ()
