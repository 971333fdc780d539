"""``MAML(cuda_graph=True)``: the engine's meta-gradient through recorded CUDA graphs
(:mod:`fastmaml.cuda_graph`), one per input shape, two at most (task chunks: the full chunks and the
remainder)."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional, Sequence

from torch import Tensor

from ..cuda_graph import GraphedMetaGradient, graph_key
from ..engine import EngineResult
from ..functional import LossFn


def replay_meta_gradient(learner, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int,
            weights: Sequence[float], loss_fn: Optional[LossFn], keep: int = 1) -> EngineResult:
    """The engine's meta-gradient through the recorded CUDA graph (recorded first if needed);
    returns copies, since the graph's outputs are overwritten by its next replay."""
    if sx.device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the model and the inputs on a CUDA device, they are on {sx.device}")
    inputs = (sx, sy, qx, qy)
    key = graph_key(learner.engine, inputs, steps, learner.first_order, weights, loss_fn, learner.memory)
    graphed = learner._graphs.get(key)
    if graphed is None:
        # release the other graphs' memory pools before recording a new one (task chunks keep two:
        # the full chunks' shape and the remainder's)
        while len(learner._graphs) >= keep:
            learner._graphs.pop(next(iter(learner._graphs)))
        learner._graphed = None
        graphed = GraphedMetaGradient(key, learner.engine, inputs, steps, learner.first_order, weights,
                                      loss_fn, learner.memory)
        learner._graphs[key] = graphed
    learner._graphed = graphed
    r = graphed(*inputs)
    return EngineResult(**{f.name: _clone(getattr(r, f.name)) for f in fields(EngineResult)})


def _clone(x):
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: v.clone() for k, v in x.items()}
    return x
