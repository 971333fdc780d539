"""fastmaml: task-batched MAML with exact meta-gradients and fused kernels."""

from .maml import MAML, FastWeights, MetaStepOutput

__version__ = "0.1.0"

__all__ = ["MAML", "FastWeights", "MetaStepOutput", "__version__"]
