"""The learner's side of ``bn_stats="running"`` (:mod:`fastmaml.bn_running`): which BatchNorm modules
normalize with running statistics, and the recorder that updates them when a call succeeds."""

from __future__ import annotations

import contextlib
from typing import List, Optional

from .. import bn_running
from ..engine import Runner


class RunningStatisticsCalls:
    """A mixin of :class:`fastmaml.MAML`: reads ``bn_stats``, ``backend``, ``model`` and ``engine``."""

    def _eval_batchnorms(self) -> List[str]:
        """bn_stats='running': the BatchNorm modules in evaluation mode (they normalize with running
        statistics); always [] for bn_stats='batch'."""
        if self.bn_stats != "running":
            return []
        return bn_running.eval_batchnorms(self.model)

    def _check_reference_eval(self, where: str) -> None:
        names = self._eval_batchnorms()
        if self.backend == "reference" and names:
            raise ValueError(
                f"{where}: backend='reference' runs per-task batch statistics only (its oracle), but "
                f"{', '.join(names)} is in evaluation mode with bn_stats='running' (running statistics); use "
                "backend='engine', or put the BatchNorm modules in training mode")

    @contextlib.contextmanager
    def _bn_updates(self, runner: Optional[Runner] = None):
        """bn_stats='running': a :class:`bn_running.Recorder` for the BatchNorm modules in training mode
        (None when there is none, or for bn_stats='batch'), applied when the outermost such context ends
        without an error; a nested context (``adapt`` and ``predict`` inside ``evaluate``) records into
        the outer one's, so the per-task order covers both. ``runner`` (default: the engine's runner
        for the built-in losses) is the call's: the statistics passes run on it when it is fused."""
        outer = self._bn_recorder
        if outer is not None:
            yield outer
            return
        rec = None
        if self.bn_stats == "running":
            bn_running.check_running(self.model)
            bns = bn_running.updating_batchnorms(self.model)
            if bns:
                runner = runner if runner is not None else self.engine.runner_for(None)
                general = self.engine.general
                rec = bn_running.Recorder(general.batched if runner is general else self.engine.batched, bns, runner)
        self._bn_recorder = rec
        try:
            yield rec
        finally:
            self._bn_recorder = None
        if rec is not None:
            rec.apply()
