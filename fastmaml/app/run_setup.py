"""What a command needs before it can run a learner: the device, threads, malloc, seeds, the learner
built from a config and the config's task sampler.

Shared by ``fastmaml train`` (:mod:`fastmaml.app.train`), its distributed ranks
(:mod:`fastmaml.app.distributed_train`), ``eval`` and ``plot``. Every failure is a one-line
:class:`~fastmaml.app.errors.UserError`.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import random
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional

# torch, numpy and the library (fastmaml.models, fastmaml.maml, fastmaml.data) are imported in the
# functions that use them: `fastmaml train --help` and `fastmaml eval --help` import this module and
# must answer without the seconds that importing torch takes (tests/test_cli_startup.py).
from .configs import Config
from .errors import UserError, first_line

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "set_threads", "keep_freed_memory", "seed_everything", "build_learner", "make_dataset"]


def resolve_device(name: Optional[str]) -> torch.device:
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available (this torch build or machine has no GPU); use --device cpu")
    return torch.device(name)


def set_threads(n: Optional[int]) -> None:
    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads {n}: expected a positive int")
    import torch

    torch.set_num_threads(n)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A meta-step allocates and frees tensors of the ``[T, P]`` layout (31.6 MB for the paper's MLP at
    T = 32) many times. By default glibc serves each from a fresh ``mmap`` (or trims the heap after it
    is freed), so the first write to every page faults: about 10,000-18,000 page faults and 25-38 ms
    of system time per ``omniglot-mlp-5w1s`` meta-step on the 2-vCPU machine, a quarter of the step.
    Serving every block from the heap (``M_MMAP_MAX = 0``) and never trimming it
    (``M_TRIM_THRESHOLD``) reuses the same pages from step to step. The process keeps its peak heap
    (a training process reaches its peak every step anyway); nothing computed changes.
    ``FASTMAML_MALLOC=default`` leaves malloc alone. True when the settings were applied (Linux with
    glibc), False elsewhere.
    """
    if os.environ.get("FASTMAML_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_learner(config: Config, device: torch.device):
    """The config's model (initialized from ``seed``) wrapped in ``fastmaml.MAML``, and Adam."""
    import torch

    from .. import models
    from ..maml import MAML

    if config["kernels"] != "auto":
        from .. import kernels

        try:
            kernels.resolve(device, config["kernels"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"kernels={config['kernels']}: {e}") from None
    if config["cuda_graph"] and device.type != "cuda":
        raise UserError(f"cuda_graph=true needs a CUDA device (--device cuda), not {device}")
    seed_everything(config["seed"])
    model = models.build(config).to(device)
    if config.get("algorithm", "maml") != "maml":  # ANIL, Reptile, iMAML, MAML++ (issue 14)
        from ..algorithms import build as algorithms

        try:
            learner = algorithms.make_learner(config, model)
            return learner, algorithms.make_optimizer(config, learner.parameters())
        except (ValueError, TypeError) as e:
            raise UserError(f"config {config['config']}: {first_line(e)}") from None
    learner = MAML(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                   first_order=config["first_order"], learn_lr=config["learn_lr"], memory=config["memory"],
                   kernels=config["kernels"], batching=config["batching"], cuda_graph=config["cuda_graph"])
    if config["adam_epsilon"] == "tf":
        from ..tf_adam import TFEpsilonAdam

        return learner, TFEpsilonAdam(learner.parameters(), lr=config["meta_lr"])
    return learner, torch.optim.Adam(learner.parameters(), lr=config["meta_lr"])


def make_dataset(config: Config, split: str, root: Optional[str], device: torch.device,
                 queries: Optional[int] = None, seed: Optional[int] = None, can_set: bool = True,
                 task_rotations: Optional[str] = None):
    """The task sampler of ``config`` for ``split`` ('train', 'val', 'test'); ``can_set``: the
    command takes ``--set`` (the data-not-found message suggests ``--set download=true`` then).
    Omniglot: ``task_rotations`` (None: the config's, meant for the training tasks; validation and
    evaluation pass their own)."""
    try:
        from .. import data
    except ImportError as e:  # pragma: no cover - the data layer is part of the package
        raise UserError(f"the data layer fastmaml.data cannot be imported: {e}") from None
    queries = config["queries"] if queries is None else queries
    seed = config["seed"] if seed is None else seed
    dataset = config["dataset"]
    try:
        if dataset == "sinusoid":
            return data.Sinusoid(shots=config["shots"], queries=queries, device=device, seed=seed)
        if dataset == "omniglot":
            return data.Omniglot(root=root, split=split, ways=config["ways"], shots=config["shots"], queries=queries,
                                 image_size=config["image_size"], split_scheme=config["split_scheme"],
                                 rotations=config["rotations"], device=device, download=config["download"],
                                 seed=seed, resize=config["resize"],
                                 task_rotations=task_rotations or config["task_rotations"],
                                 task_pool=config["task_pool"])
        if dataset == "miniimagenet":
            kw: Dict[str, Any] = {}
            params = inspect.signature(data.MiniImageNet).parameters
            if "download" in params:
                kw["download"] = config["download"]
            if "image_size" in params:
                kw["image_size"] = config["image_size"]
            return data.MiniImageNet(root, split=split, ways=config["ways"], shots=config["shots"], queries=queries,
                                     device=device, seed=seed, **kw)
    except data.DataNotFound as e:
        where = " or ".join(e.places)
        detail = f" ({e.detail})" if e.detail else ""
        fix = (f"add --data DIR (the folder holding {dataset}/)"
               + (" or --set download=true to fetch it" if dataset == "omniglot" and "download" in config and can_set
                  else "" if dataset == "omniglot" else " (it is not downloaded automatically)"))
        raise UserError(f"{dataset} data not found: no {e.expected} in {where}{detail}. Fix: {fix}") from None
    except data.PackageFileMissing as e:
        raise UserError(str(e)) from None
    except (ValueError, OSError) as e:
        raise UserError(f"cannot load the {dataset} {split} data: {first_line(e)}") from None
    raise UserError(f"unknown dataset {dataset!r}")
