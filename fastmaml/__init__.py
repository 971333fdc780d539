"""fastmaml: task-batched MAML with exact meta-gradients and fused kernels."""

from .maml import MAML, FastWeights, MetaStepOutput
from .algorithms import ANIL, IMAML, MAMLPPSchedule, Reptile  # issue 14: the rest of the MAML family

__version__ = "0.1.0"

__all__ = ["MAML", "FastWeights", "MetaStepOutput", "ANIL", "Reptile", "IMAML", "MAMLPPSchedule", "__version__"]
