"""The fused runner: the model on the project's task-batched layer kernels (docs/design.md).

Models made of the layers in :mod:`fastmaml.layers.program` (Conv2d, BatchNorm, ReLU/LeakyReLU,
MaxPool2d(2), global mean, Flatten, Linear; ``nn.Sequential`` and Conv4) with the built-in losses run
as one compiled program (:class:`fastmaml.layers.runner.FusedModel`): forward, backward and the HVP
by the R-operator (docs/design.md §4), without autograd.

The layer kernels (torch, C++ or Triton) depend on the device the model is on, which may change
after the learner is built (``learner.to("cuda")``): the backend's name is fixed here, and each
device gets its own ``FusedModel`` with the kernels resolved for it on first use
(:func:`fastmaml.layers.layer_kernels`), so that no call ever rewrites another's kernels.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import layers
from .. import step_context
from ..functional import LossFn
from ..layers.program import compile_model
from ..layers.runner import FusedModel
from ..layout import FlatLayout
from .runner import QueryGrad, Runner, SupportGrad


class FusedRunner(Runner):
    """The engine's fused path. Raises :class:`fastmaml.layers.program.Unsupported` for a model it
    cannot compile (the engine then takes the generic runner and says why)."""

    kind = "fused"
    measures_states = True
    writes_hvp_into_buffer = True

    def __init__(self, model: nn.Module, layout: FlatLayout, layer_backend: str) -> None:
        self.model = model
        self.layout = layout
        self.nodes = compile_model(model)
        #: 'auto', 'torch', 'cpp' or 'triton' (:func:`fastmaml.layers.layer_kernels`)
        self.layer_backend = layer_backend
        self._on_device: Dict[torch.device, FusedModel] = {}

    def model_on(self, device: torch.device) -> FusedModel:
        """The compiled model with the layer kernels for ``device``."""
        fused = self._on_device.get(device)
        if fused is None:
            fused = FusedModel(self.model, self.layout, self.nodes, layers.layer_kernels(device, self.layer_backend))
            self._on_device[device] = fused
        return fused

    def describe(self, device: torch.device) -> str:
        return f"{layers.layer_kernels(device, self.layer_backend).name} layer kernels"

    def forget_trainable(self) -> None:
        for fused in self._on_device.values():
            fused.forget_trainable()

    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        return self.model_on(x.device).forward(flat, x, step=step_context.current_step())

    def support_grad(self, theta_k: Tensor, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], create_graph: bool,
                     grad_out: Optional[Tensor] = None) -> SupportGrad:
        r = self.model_on(x.device).grad(theta_k.detach(), x, y, keep=create_graph,
                                         step=step_context.current_step(), out=grad_out)
        return r.grad, r.losses, r.state

    def query_grad(self, theta_k: Tensor, x: Tensor, y: Tensor, loss_fn: Optional[LossFn], scale: float,
                   shared_list: List[Tensor], shared_names: List[str]) -> QueryGrad:
        r = self.model_on(x.device).grad(theta_k.detach(), x, y, scale=scale, shared=bool(shared_list),
                                         step=step_context.current_step())
        return r.grad, r.losses, r.pred, r.shared

    def mean_query_grad(self, phi: Tensor, x: Tensor, y: Tensor, num_tasks: int, loss_fn: Optional[LossFn],
                        shared: Dict[str, Tensor]) -> QueryGrad:
        # the fused query pass: its losses and shared gradients come with it
        r = self.model_on(x.device).grad(phi.detach(), x, y, scale=1.0 / num_tasks, shared=bool(shared))
        return r.grad, r.losses, r.pred, dict(r.shared)

    def hvp(self, state, u: Tensor, shared_list: List[Tensor], shared_names: List[str],
            out: Optional[Tensor] = None, retain_graph: bool = False) -> Tuple[Tensor, List[Optional[Tensor]]]:
        hv, terms = self.model_on(u.device).hvp(state, u, shared=bool(shared_list), out=out)
        return hv, [terms.get(n) for n in shared_names]

    def state_bytes(self, state) -> int:
        return state.nbytes
