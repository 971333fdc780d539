"""The generic on-device episode sampler over a uint8 ``[classes, examples, ...]`` tensor.

A meta-batch of T N-way K-shot tasks with Q queries per class is drawn with a handful of tensor
ops and no Python loop over tasks or images:

1. classes: N distinct classes per task, in uniformly random order -> labels 0..N-1;
2. examples: K + Q distinct examples per (task, class), in random order; the first K are the
   support, the rest the query, so support and query never share an image;
3. one ``index_select`` per set on the flattened ``[classes * examples, ...]`` uint8 tensor, then
   conversion to float32 and (optionally) ``x * scale + shift`` on the device.

Sampling without replacement (``sample_without_replacement``): ``torch.rand(..., n).topk(k)``
(the indices of the k largest of n iid keys: a uniformly random ordered k-subset). On the CPU, when
k is small against n (k * k <= n, e.g. 5 of 4112 Omniglot classes), drawing n keys per task would
dominate the cost, so k iid ``randint`` values are drawn instead and the rows that repeat a value
are drawn again (rejection; about k^2 / 2n of the rows, so almost always a single round). Both
give every ordered k-tuple of distinct values the same probability.

Reproducibility: training draws use a ``torch.Generator`` on the sampler's device, seeded with
``seed``: the same seed gives the same episodes (on the same kind of device);
``state_dict``/``load_state_dict`` save and restore it. ``episodes(n, batch, seed)`` yields fixed
evaluation episodes from its own CPU generator (the training generator is untouched), drawn in
chunks of ``EVAL_CHUNK`` episodes, so episode i depends only on ``seed`` and ``i``: not on
``batch``, not on ``n``, not on the device.

A task pool (``task_pool=P > 0``, what the MAML code does: it draws 200,000 training tasks up front
and cycles through them in order): the first call to ``sample`` draws P tasks from a generator of
their own, seeded by ``seed`` alone, and training task i is pool entry ``i mod P``
(``tasks_sampled`` says where the stream is, so a resumed sampler continues the cycle). A sampler
may redraw part of each pooled task every time (``_finish_task``: Omniglot's per-character
rotations, as in the code). Evaluation episodes never come from the pool.

Episode layout: support sorted by label then shot (``support_y = [0]*K + [1]*K + ...``), query
likewise by label then query; labels are random per task because the class order is.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

EVAL_CHUNK = 256
POOL_CHUNK = 8192      # tasks drawn at a time when a pool is built (bounds the topk keys' memory)
POOL_SEED_SALT = 0x706F6F6C  # "pool": the pool's generator is not the training generator


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (ints, numpy ints, 0-d integer tensors), else a clear error."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def sample_without_replacement(
    batch_shape: Sequence[int], n: int, k: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """int64 ``[*batch_shape, k]``: k distinct values of ``range(n)`` per entry, in uniformly random
    order (see the module docstring for the two algorithms)."""
    shape = tuple(batch_shape)
    if k == 0:
        return torch.empty(*shape, 0, dtype=torch.long, device=device)
    if device.type == "cpu" and k * k <= n:
        # rejection: iid uniform draws; rows with a repeated value are drawn again (whole rows, so
        # the accepted rows are uniform over ordered k-tuples of distinct values)
        out = torch.randint(0, n, (*shape, k), generator=generator, device=device)
        rows = out.view(-1, k)
        while k > 1:
            s = rows.sort(dim=1).values
            bad = (s[:, 1:] == s[:, :-1]).any(1).nonzero().squeeze(1)
            if bad.numel() == 0:
                break
            rows[bad] = torch.randint(0, n, (bad.numel(), k), generator=generator, device=device)
        return out
    keys = torch.rand(*shape, n, generator=generator, device=device)
    return keys.topk(k, dim=-1).indices


def iter_fixed_batches(
    num_episodes: int, batch: int, seed: int, draw: Callable[[int, torch.Generator], Tuple[Tensor, ...]]
) -> Iterator[Tuple[Tensor, ...]]:
    """Yield batches of ``batch`` episodes (the last may be smaller) of tensors drawn by
    ``draw(EVAL_CHUNK, cpu_generator)`` (first dim = episode), always a full chunk at a time so
    that episode i depends only on ``seed`` and ``i``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    buf: Optional[Tuple[Tensor, ...]] = None
    for start in range(0, num_episodes, EVAL_CHUNK):
        n = min(EVAL_CHUNK, num_episodes - start)
        chunk = tuple(x[:n] for x in draw(EVAL_CHUNK, g))
        buf = chunk if buf is None else tuple(torch.cat([a, b]) for a, b in zip(buf, chunk))
        last = start + EVAL_CHUNK >= num_episodes
        while buf[0].shape[0] >= batch or (last and buf[0].shape[0] > 0):
            take = min(batch, buf[0].shape[0])
            yield tuple(x[:take] for x in buf)
            buf = tuple(x[take:] for x in buf)


def _as_param(value, item_shape, device, name) -> Optional[Tensor]:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).to(device)
    try:
        torch.broadcast_shapes(t.shape, tuple(item_shape))
    except RuntimeError:
        raise ValueError(f"{name}: expected a shape broadcastable to {tuple(item_shape)}, got {tuple(t.shape)}") from None
    return t


class TaskSampler:
    """N-way K-shot episodes from ``images``: uint8 ``[classes, examples, *item]`` (any device).

    ``sample(T)`` returns ``(support_x [T, N*K, *item_shape] float32, support_y [T, N*K] int64,
    query_x [T, N*Q, *item_shape], query_y [T, N*Q])`` with ``x = float(uint8) * scale + shift``
    (no scaling when both are None). ``item_shape`` reshapes each item (e.g. ``[H, W]`` ->
    ``[1, H, W]``); ``class_names`` and ``name`` only serve reports and error messages.
    """

    def __init__(
        self,
        images: Tensor,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        device="cpu",
        seed: int = 0,
        *,
        scale=None,
        shift=None,
        item_shape: Optional[Sequence[int]] = None,
        class_names: Optional[Sequence[str]] = None,
        name: str = "the dataset",
        task_pool: int = 0,
    ):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() < 2:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images: expected a uint8 tensor [classes, examples, ...], got {got}")
        self.ways = check_int("ways", ways, 1)
        self.shots = check_int("shots", shots, 1)
        self.queries = check_int("queries", queries, 0)
        self.seed = check_int("seed", seed, 0)
        self.task_pool = check_int("task_pool", task_pool, 0)
        self._pool: Optional[Tuple[Tensor, ...]] = None
        self.device = torch.device(device)
        self.name = name
        num_classes, per_class = images.shape[:2]
        if self.ways > num_classes:
            raise ValueError(
                f"ways: expected at most {num_classes} (the number of classes in {name}), got {self.ways}"
            )
        if self.shots + self.queries > per_class:
            raise ValueError(
                f"shots + queries: expected at most {per_class} (the examples per class in {name}), "
                f"got shots={self.shots} + queries={self.queries} = {self.shots + self.queries}"
            )
        self.images = images.to(self.device).contiguous()
        raw_shape = tuple(self.images.shape[2:])
        self.item_shape = tuple(int(s) for s in item_shape) if item_shape is not None else raw_shape
        if math.prod(self.item_shape) != math.prod(raw_shape):
            raise ValueError(f"item_shape: expected {math.prod(raw_shape)} elements like {raw_shape}, got {self.item_shape}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.class_names = list(class_names) if class_names is not None else None
        self._flat = self.images.view(num_classes * per_class, *self.item_shape)
        self._scale = _as_param(scale, self.item_shape, self.device, "scale")
        self._shift = _as_param(shift, self.item_shape, self.device, "shift")
        arange = torch.arange(self.ways, device=self.device)
        self._support_labels = arange.repeat_interleave(self.shots)
        self._query_labels = arange.repeat_interleave(self.queries)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)
        self.tasks_sampled = 0

    # ---- properties -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def examples_per_class(self) -> int:
        return int(self.images.shape[1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name}: {self.num_classes} classes x {self.examples_per_class}, "
            f"item {self.item_shape}, {self.ways}-way {self.shots}-shot {self.queries}-query, "
            f"device={self.device}, seed={self.seed}" + (f", task_pool={self.task_pool}" if self.task_pool else "") + ")"
        )

    # ---- sampling ---------------------------------------------------------------------------
    def _draw(self, num_tasks: int, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor]:
        classes = sample_without_replacement((num_tasks,), self.num_classes, self.ways, generator, device)
        examples = sample_without_replacement(
            (num_tasks, self.ways), self.examples_per_class, self.shots + self.queries, generator, device
        )
        return classes, examples

    # What a pooled task keeps and what is drawn again each time it is used. By default a task is
    # all kept: (classes [n, N], examples [n, N, K+Q]); Omniglot's per-character rotations keep the
    # characters and redraw their rotations. Evaluation episodes are drawn the same way (never pooled).
    def _draw_kept(self, num_tasks: int, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, ...]:
        return self._draw(num_tasks, generator, device)

    def _finish_task(self, kept: Tuple[Tensor, ...], generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        return kept[0], kept[1]

    def _build_pool(self) -> Tuple[Tensor, ...]:
        """The ``task_pool`` tasks' kept parts, on the CPU in the smallest integer type that holds
        them (200,000 20-way 5-shot tasks: 48 MB instead of 352 MB as int64)."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed ^ POOL_SEED_SALT)
        cpu = torch.device("cpu")
        parts = [self._draw_kept(min(POOL_CHUNK, self.task_pool - i), g, cpu)
                 for i in range(0, self.task_pool, POOL_CHUNK)]
        out = []
        for chunks in zip(*parts):
            t = torch.cat(chunks)
            top = int(t.max()) if t.numel() else 0
            out.append(t.to(torch.uint8 if top < 256 else torch.int16 if top < 32768 else torch.int32))
        return tuple(out)

    def _draw_training(self, num_tasks: int) -> Tuple[Tensor, Tensor]:
        if not self.task_pool:
            kept = self._draw_kept(num_tasks, self._generator, self.device)
        else:
            if self._pool is None:
                self._pool = self._build_pool()
            rows = (torch.arange(num_tasks) + self.tasks_sampled) % self.task_pool
            kept = tuple(p.index_select(0, rows).to(self.device, torch.long) for p in self._pool)
        return self._finish_task(kept, self._generator)

    def _load(self, index: Tensor) -> Tensor:
        t, m = index.shape
        x = self._flat.index_select(0, index.reshape(-1)).to(torch.float32)
        if self._scale is not None:
            x.mul_(self._scale)
        if self._shift is not None:
            x.add_(self._shift)
        return x.view(t, m, *self.item_shape)

    def _episode(self, classes: Tensor, examples: Tensor, return_indices: bool):
        t = classes.shape[0]
        index = classes.unsqueeze(-1) * self.examples_per_class + examples  # [T, N, K+Q] flat image ids
        s_idx = index[..., : self.shots].reshape(t, self.ways * self.shots)
        q_idx = index[..., self.shots :].reshape(t, self.ways * self.queries)
        out = (
            self._load(s_idx),
            self._support_labels.expand(t, -1).clone(),
            self._load(q_idx),
            self._query_labels.expand(t, -1).clone(),
        )
        return out + (s_idx, q_idx) if return_indices else out

    def sample(self, num_tasks: int, return_indices: bool = False):
        """One meta-batch of ``num_tasks`` episodes from the training generator.

        With ``return_indices=True`` also returns ``support_idx [T, N*K]`` and ``query_idx
        [T, N*Q]``: flat image ids ``class * examples_per_class + example`` into ``images``
        (``images.flatten(0, 1)[idx]`` is the uint8 image; ``idx // examples_per_class`` its class).
        """
        t = check_int("num_tasks", num_tasks, 1)
        classes, examples = self._draw_training(t)
        self.tasks_sampled += t
        return self._episode(classes, examples, return_indices)

    def episodes(self, num_episodes: int, batch: int = 32, seed: int = 0, return_indices: bool = False):
        """Iterator over ``num_episodes`` fixed evaluation episodes in batches of ``batch`` (the last
        batch may be smaller), determined by ``seed`` alone; the training generator is untouched."""
        num_episodes = check_int("num_episodes", num_episodes, 0)
        batch = check_int("batch", batch, 1)
        seed = check_int("seed", seed, 0)
        cpu = torch.device("cpu")

        def draw(n, g):
            return self._finish_task(self._draw_kept(n, g, cpu), g)

        def gen():
            for classes, examples in iter_fixed_batches(num_episodes, batch, seed, draw):
                yield self._episode(classes.to(self.device), examples.to(self.device), return_indices)

        return gen()

    # ---- state ------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Restart the training generator from ``seed``."""
        self.seed = check_int("seed", seed, 0)
        self._generator.manual_seed(self.seed)
        self._pool = None  # the pool follows the seed

    def state_dict(self) -> dict:
        """``{"seed": int, "generator_state": uint8 tensor, "tasks_sampled": int}``: plain tensors and
        ints, loadable with ``torch.load(..., weights_only=True)``."""
        return {"seed": self.seed, "generator_state": self._generator.get_state(), "tasks_sampled": self.tasks_sampled}

    def load_state_dict(self, state: dict) -> None:
        """Resume the training generator exactly where ``state_dict()`` was taken."""
        load_generator_state(self, state)
        self._pool = None  # rebuilt from the (possibly restored) seed when next needed


def load_generator_state(obj, state: dict) -> None:
    """Shared by all samplers: restore ``seed``, ``tasks_sampled`` and the generator state."""
    if not isinstance(state, dict) or "generator_state" not in state:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state: expected a dict from state_dict() with 'generator_state', got {got}")
    gs = state["generator_state"]
    if not isinstance(gs, Tensor) or gs.dtype != torch.uint8:
        raise ValueError(f"state['generator_state']: expected a uint8 tensor, got {type(gs).__name__}")
    obj._generator.set_state(gs.detach().to("cpu"))
    if "seed" in state:
        obj.seed = int(state["seed"])
    if "tasks_sampled" in state:
        obj.tasks_sampled = int(state["tasks_sampled"])
