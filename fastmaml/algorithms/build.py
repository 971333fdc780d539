"""The algorithm a config names, for ``fastmaml train`` / ``eval``: the learner, its outer optimizer
and the per-iteration schedule (a pure function of the iteration, so resumed runs follow it).

Config keys read here (each present only in the configs of the algorithm that uses it):
``algorithm`` (maml, anil, reptile, imaml, mamlpp), ``lr_mode``, ``first_order_iterations``,
``msl_iterations``, ``meta_lr_schedule`` (constant, cosine, linear), ``min_meta_lr``,
``meta_optimizer`` (adam, sgd), ``reptile_variant``, ``inner_batch``, ``inner_data``,
``imaml_lambda``, ``cg_steps``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .anil import ANIL
from .imaml import IMAML
from .mamlpp import MAMLPPSchedule, cosine_lr
from .reptile import Reptile

ALGORITHMS = ("maml", "anil", "reptile", "imaml", "mamlpp")

__all__ = ["ALGORITHMS", "make_learner", "make_optimizer", "make_schedule"]


def make_learner(config: Dict[str, Any], model: nn.Module):
    """The learner of ``config['algorithm']`` (None for plain MAML: the caller builds it)."""
    algo = config.get("algorithm", "maml")
    common = dict(kernels=config["kernels"], batching=config["batching"])
    if algo == "anil":
        return ANIL(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                    first_order=config["first_order"], learn_lr=config["learn_lr"], **common)
    if algo == "reptile":
        return Reptile(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                       variant=config["reptile_variant"], outer_lr=config["meta_lr"],
                       inner_batch=config["inner_batch"] or None, inner_data=config["inner_data"], **common)
    if algo == "imaml":
        return IMAML(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                     lam=config["imaml_lambda"], cg_steps=config["cg_steps"], **common)
    if algo == "mamlpp":
        from ..maml import MAML

        return MAML(model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                    first_order=config["first_order"], learn_lr=config["learn_lr"],
                    lr_mode=config.get("lr_mode"), memory=config["memory"], **common)
    if algo == "maml":
        return None
    raise ValueError(f"unknown algorithm {algo!r}; one of {', '.join(ALGORITHMS)}")


def make_optimizer(config: Dict[str, Any], params) -> torch.optim.Optimizer:
    tf_eps = config.get("adam_epsilon", "torch") == "tf"
    if config.get("meta_optimizer", "adam") == "sgd":
        if tf_eps:
            raise ValueError("adam_epsilon=tf: this config's meta-optimizer is SGD (meta_optimizer=sgd), not Adam")
        return torch.optim.SGD(params, lr=config["meta_lr"])
    if tf_eps:
        from ..tf_adam import TFEpsilonAdam

        return TFEpsilonAdam(params, lr=config["meta_lr"])
    return torch.optim.Adam(params, lr=config["meta_lr"])


def make_schedule(config: Dict[str, Any]) -> Optional[Callable[[Any, torch.optim.Optimizer, int], None]]:
    """``hook(learner, optimizer, it)`` to call before iteration ``it`` (1-based), or None."""
    total = config["iterations"]
    kind = config.get("meta_lr_schedule", "constant")
    lr0, lr_min = config["meta_lr"], config.get("min_meta_lr", 0.0)
    if config.get("algorithm") == "mamlpp":
        sched = MAMLPPSchedule(total, config.get("first_order_iterations", 0), config.get("msl_iterations", 0),
                               lr0, lr_min if kind == "cosine" else None, base_first_order=config["first_order"])
        return lambda learner, opt, it: sched.apply(learner, opt, it)
    if kind == "constant":
        return None

    def lr_at(it: int) -> float:
        if kind == "cosine":
            return cosine_lr(it, total, lr0, lr_min)
        return lr_min + (lr0 - lr_min) * (1.0 - (it - 1) / total)  # linear: lr0 at 1, -> lr_min at the end

    def hook(learner, opt, it: int) -> None:
        lr = lr_at(it)
        for g in opt.param_groups:
            g["lr"] = lr
        if isinstance(learner, Reptile) and learner.variant == "serial":
            learner.set_outer_lr(max(lr, 1e-12))

    return hook
