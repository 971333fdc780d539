"""The sinusoid regression task distribution of the MAML paper.

Each task: ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``phi ~ U[0, pi]``;
support and query inputs ``x ~ U[-5, 5]`` drawn independently. Generated on ``device`` from a
seeded generator; reproducibility and evaluation episodes behave as in ``sampler.TaskSampler``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sampler import check_int, iter_fixed_batches, load_generator_state


def _range(name, value) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (low, high), got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"{name}: expected low <= high, got ({lo}, {hi})")
    return lo, hi


class Sinusoid:
    """K-shot sinusoid regression tasks.

    ``sample(T)`` -> ``support_x [T, K, 1], support_y [T, K, 1], query_x [T, Q, 1], query_y [T, Q, 1]``
    (float32); ``sample(T, return_params=True)`` appends ``amplitude [T]`` and ``phase [T]``.
    ``last_params`` holds ``(amplitude, phase)`` of the latest ``sample`` call.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        device="cpu",
        seed: int = 0,
        *,
        amplitude=(0.1, 5.0),
        phase=(0.0, math.pi),
        x_range=(-5.0, 5.0),
    ):
        self.shots = check_int("shots", shots, 1)
        self.queries = check_int("queries", queries, 0)
        self.seed = check_int("seed", seed, 0)
        self.device = torch.device(device)
        self.amplitude_range = _range("amplitude", amplitude)
        self.phase_range = _range("phase", phase)
        self.x_range = _range("x_range", x_range)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)
        self.tasks_sampled = 0
        self.last_params: Optional[Tuple[Tensor, Tensor]] = None

    def __repr__(self) -> str:
        return (f"Sinusoid({self.shots}-shot, {self.queries} queries, amplitude {self.amplitude_range}, "
                f"phase {self.phase_range}, x {self.x_range}, device={self.device}, seed={self.seed})")

    def _uniform(self, shape, bounds, g, device) -> Tensor:
        lo, hi = bounds
        return torch.rand(*shape, generator=g, device=device).mul_(hi - lo).add_(lo)

    def _draw(self, t: int, g: torch.Generator, device) -> Tuple[Tensor, ...]:
        amp = self._uniform((t,), self.amplitude_range, g, device)
        phase = self._uniform((t,), self.phase_range, g, device)
        xs = self._uniform((t, self.shots, 1), self.x_range, g, device)
        xq = self._uniform((t, self.queries, 1), self.x_range, g, device)
        return amp, phase, xs, xq

    @staticmethod
    def _make(amp, phase, xs, xq, return_params):
        a, p = amp[:, None, None], phase[:, None, None]
        out = (xs, a * torch.sin(xs - p), xq, a * torch.sin(xq - p))
        return out + (amp, phase) if return_params else out

    def sample(self, num_tasks: int, return_params: bool = False):
        t = check_int("num_tasks", num_tasks, 1)
        amp, phase, xs, xq = self._draw(t, self._generator, self.device)
        self.tasks_sampled += t
        self.last_params = (amp, phase)
        return self._make(amp, phase, xs, xq, return_params)

    def episodes(self, num_episodes: int, batch: int = 32, seed: int = 0, return_params: bool = False):
        """Fixed evaluation episodes (see ``TaskSampler.episodes``): depend only on ``seed`` and the
        episode's position, drawn on the CPU and moved to ``device``."""
        num_episodes = check_int("num_episodes", num_episodes, 0)
        batch = check_int("batch", batch, 1)
        seed = check_int("seed", seed, 0)
        cpu = torch.device("cpu")

        def gen():
            for amp, phase, xs, xq in iter_fixed_batches(num_episodes, batch, seed, lambda n, g: self._draw(n, g, cpu)):
                d = self.device
                yield self._make(amp.to(d), phase.to(d), xs.to(d), xq.to(d), return_params)

        return gen()

    def manual_seed(self, seed: int) -> None:
        self.seed = check_int("seed", seed, 0)
        self._generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator_state": self._generator.get_state(), "tasks_sampled": self.tasks_sampled}

    def load_state_dict(self, state: dict) -> None:
        load_generator_state(self, state)
