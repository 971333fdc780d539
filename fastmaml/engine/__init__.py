"""The task-batched meta-gradient engine (docs/design.md §2 and §3).

* :mod:`.engine`: :class:`Engine`: the inner loop over [T, P] iterates, its reverse pass (the
  meta-gradient), memory modes and the store budget; it picks its runner once, in its constructor.
* :mod:`.runner`: the interface of a runner, what the engine asks of the model.
* :mod:`.fused_runner`: the fused runner (task-batched layer kernels, R-operator HVP).
* :mod:`.generic_runner`: the generic runners (vmap or a loop over autograd; several inputs).
* :mod:`.general_batch`: several inputs, pytree targets and per-task losses for the generic runner.
* :mod:`.results`: :class:`EngineResult` and :class:`InnerLoop`.

``fastmaml.engine.Engine`` (and the other names below) keep their import path.
"""

from .engine import BATCHING, MEMORY_MODES, Engine
from .fused_runner import FusedRunner
from .generic_runner import GeneralRunner, GenericRunner
from .results import EngineResult, InnerLoop
from .runner import Runner

__all__ = ["BATCHING", "MEMORY_MODES", "Engine", "EngineResult", "InnerLoop", "Runner", "FusedRunner",
           "GenericRunner", "GeneralRunner"]
