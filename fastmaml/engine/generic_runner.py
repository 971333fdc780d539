"""The generic runner: any model and any loss, over autograd (docs/design.md §3).

The module runs for all tasks as ``torch.func.vmap`` of ``functional_call`` or as a loop over tasks
(:class:`fastmaml.functional.TaskBatchedModel`), the support gradients come from autograd, and the
HVP from autograd's double backward of the support gradient kept with its graph:

    state = (g, leaf):  g = dL_S/dleaf with create_graph,  H u = d<g, u>/dleaf,
    shared terms       = d<g, u>/dphi  (phi: the trainable parameters the inner loop does not adapt)

:class:`GeneralRunner` is the same runner for several inputs, pytree targets and losses that run
per task (:mod:`fastmaml.engine.general_batch`); only its forward and losses differ.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..functional import LossFn, TaskBatchedModel, task_losses
from ..layout import FlatLayout
from .general_batch import GeneralBatchedModel, general_task_losses
from .runner import QueryGrad, Runner, SupportGrad


class GenericRunner(Runner):
    """The engine's generic path on tensor inputs and targets.

    ``batching``: 'auto', 'vmap' or 'loop' (:class:`fastmaml.functional.TaskBatchedModel`);
    ``keep_eval_batchnorm``: BatchNorm modules in evaluation mode normalize with their running
    statistics (``MAML(bn_stats="running")``), else every BatchNorm uses per-task batch statistics."""

    kind = "generic"
    measures_states = False
    writes_hvp_into_buffer = False

    def __init__(self, model: nn.Module, layout: FlatLayout, batching: str, keep_eval_batchnorm: bool = False) -> None:
        self.batched = self._batched_model(model, layout, batching)
        self.batched.bn_keep_eval = keep_eval_batchnorm

    @staticmethod
    def _batched_model(model: nn.Module, layout: FlatLayout, batching: str) -> TaskBatchedModel:
        return TaskBatchedModel(model, layout, batching)

    @property
    def batching(self) -> str:
        return self.batched.batching

    def describe(self, device: torch.device) -> str:
        return self.batched.batching

    def losses(self, flat: Tensor, x, y, loss_fn: Optional[LossFn]) -> Tuple[Tensor, Tensor]:
        """(L [T], predictions) at ``flat``."""
        pred = self.batched.forward(flat, x)
        return task_losses(pred, y, loss_fn), pred

    def forward(self, flat: Tensor, x) -> Tensor:
        return self.batched.forward(flat, x)

    def support_grad(self, theta_k: Tensor, x, y, loss_fn: Optional[LossFn], create_graph: bool,
                     grad_out: Optional[Tensor] = None) -> SupportGrad:
        T = x.shape[0]
        leaf = theta_k.detach().expand(T, -1).clone().requires_grad_(True) if theta_k.dim() == 1 \
            else theta_k.detach().requires_grad_(True)
        losses, _ = self.losses(leaf, x, y, loss_fn)
        (g,) = torch.autograd.grad(losses.sum(), leaf, create_graph=create_graph)
        return (g.detach() if not create_graph else g), losses, ((g, leaf) if create_graph else None)

    def query_grad(self, theta_k: Tensor, x, y, loss_fn: Optional[LossFn], scale: float,
                   shared_list: List[Tensor], shared_names: List[str]) -> QueryGrad:
        leaf = theta_k.detach().requires_grad_(True)
        losses, pred = self.losses(leaf, x, y, loss_fn)
        grads = torch.autograd.grad(losses.sum() * scale, [leaf] + shared_list, allow_unused=True)
        shared: Dict[str, Tensor] = {name: gp for name, gp in zip(shared_names, grads[1:]) if gp is not None}
        return grads[0], losses.detach(), pred, shared

    def mean_query_grad(self, phi: Tensor, x, y, num_tasks: int, loss_fn: Optional[LossFn],
                        shared: Dict[str, Tensor]) -> QueryGrad:
        with torch.enable_grad():
            leaf = phi.detach().clone().requires_grad_(True)
            pred = self.batched.forward(leaf, x)
            losses = task_losses(pred, y, loss_fn)
            grads = torch.autograd.grad(losses.sum() / num_tasks, [leaf] + list(shared.values()), allow_unused=True)
        sh = {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(shared.items(), grads[1:])}
        return grads[0], losses.detach(), pred.detach(), sh

    def hvp(self, state, u: Tensor, shared_list: List[Tensor], shared_names: List[str],
            out: Optional[Tensor] = None, retain_graph: bool = False) -> Tuple[Tensor, List[Optional[Tensor]]]:
        g, leaf = state
        grads = torch.autograd.grad(g, [leaf] + shared_list, grad_outputs=u, allow_unused=True,
                                    retain_graph=retain_graph)
        return grads[0], list(grads[1:])

    def state_bytes(self, state) -> int:
        # the autograd graph is not measured: its support gradient [T, P] stands for it
        g, _ = state
        return g.numel() * g.element_size()


class GeneralRunner(GenericRunner):
    """The generic runner for several inputs (``TaskInputs``), pytree targets and losses that run per
    task: its forward takes ``model(*inputs)`` and its losses :func:`general_task_losses` (vmapped,
    or task after task when vmap cannot run the loss, remembered per loss in ``loss_modes``)."""

    def __init__(self, model: nn.Module, layout: FlatLayout, batching: str, keep_eval_batchnorm: bool = False) -> None:
        super().__init__(model, layout, batching, keep_eval_batchnorm)
        self.loss_modes: Dict[int, str] = {}

    @staticmethod
    def _batched_model(model: nn.Module, layout: FlatLayout, batching: str) -> TaskBatchedModel:
        return GeneralBatchedModel(model, layout, batching)

    def losses(self, flat: Tensor, x, y, loss_fn: Optional[LossFn]) -> Tuple[Tensor, Tensor]:
        pred = self.batched.forward(flat, x)
        return general_task_losses(pred, y, loss_fn, self.loss_modes), pred

    def mean_query_grad(self, phi: Tensor, x, y, num_tasks: int, loss_fn: Optional[LossFn],
                        shared: Dict[str, Tensor]) -> QueryGrad:
        raise NotImplementedError("iMAML's outer gradient runs on the fused or the generic runner, "
                                  "not on several inputs")

    def support_grad(self, theta_k: Tensor, x, y, loss_fn: Optional[LossFn], create_graph: bool,
                     grad_out: Optional[Tensor] = None) -> SupportGrad:
        if theta_k.dim() == 1:
            theta_k = theta_k.expand(x.shape[0], -1)
        return super().support_grad(theta_k, x, y, loss_fn, create_graph, grad_out=grad_out)
