"""The engine's meta-gradient recorded once in a CUDA graph and replayed (``MAML(cuda_graph=True)``).

A meta-step at T = 32 launches thousands of small kernels (K forward and backward passes, a double
backward per step, the fused ops); at these sizes the GPU waits on the CPU that launches them. A CUDA
graph records the whole launch sequence once and replays it with one call.

What a replay assumes, and how this module keeps it true:

* Static shapes: the inputs are copied into buffers owned by the graph. A call whose inputs differ in
  shape, dtype or device, or whose steps / first_order / weights / loss_fn / memory mode differ,
  records a new graph (the previous one is released): correct, but as slow as a first step.
* Static parameter storage: the graph reads the parameters (and the inner learning rates) where they
  lay when it was recorded. ``torch.optim`` optimizers and ``load_state_dict`` update them in place,
  which the graph sees; a parameter replaced by a new tensor (``p.data = ...``, moving the model)
  changes its address, which is part of the key, so the graph is recorded again.
* Outputs live in the graph's memory pool and are overwritten by the next replay: ``MAML`` copies
  what it returns or accumulates into ``.grad`` before it hands anything to the caller.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .engine import Engine, EngineResult
from .functional import LossFn

WARMUP_STEPS = 2  # eager steps on a side stream before capture (cuDNN/cuBLAS/Triton set-up, autograd's streams)


def graph_key(engine: Engine, inputs: Sequence[Tensor], steps: int, first_order: bool,
              weights: Sequence[float], loss_fn: Optional[LossFn], memory: str) -> Hashable:
    """Everything a recorded graph depends on; a different key needs a new graph."""
    params = [p for p in engine.model.parameters()] + [engine.inner_lr.lr]
    return (
        tuple((tuple(t.shape), t.dtype, t.device) for t in inputs),
        steps, bool(first_order), tuple(float(w) for w in weights), loss_fn, memory,
        tuple((p.data_ptr(), p.requires_grad) for p in params),
    )


class GraphedMetaGradient:
    """``engine.meta_gradient`` for one fixed configuration, captured in a ``torch.cuda.CUDAGraph``.

    ``__call__(support_x, support_y, query_x, query_y)`` copies the inputs into the static buffers,
    replays the graph and returns the static ``EngineResult`` (valid until the next replay).
    """

    def __init__(self, key: Hashable, engine: Engine, inputs: Tuple[Tensor, Tensor, Tensor, Tensor], steps: int,
                 first_order: bool, weights: Sequence[float], loss_fn: Optional[LossFn], memory: str) -> None:
        self.key = key  # graph_key(...) of these arguments, computed by the caller
        self.static_inputs = tuple(t.detach().clone() for t in inputs)

        def run() -> EngineResult:
            return engine.meta_gradient(*self.static_inputs, steps, first_order, weights, loss_fn, memory)

        # Warm-up on a side stream, as torch.cuda.graph requires for code that runs autograd.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.result = run()
        except RuntimeError as e:
            raise RuntimeError(
                "fastmaml.MAML(cuda_graph=True): capturing the meta-step in a CUDA graph failed; the model "
                "or loss_fn probably synchronizes with the CPU (.item(), a data-dependent shape, a host "
                f"copy). Use cuda_graph=False for this model. Cause: {e}"
            ) from e

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> EngineResult:
        for dst, src in zip(self.static_inputs, (support_x, support_y, query_x, query_y)):
            dst.copy_(src)
        self.graph.replay()
        return self.result
