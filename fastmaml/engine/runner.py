"""The runner interface: how the engine runs the model for all T tasks at once (docs/design.md).

The engine (:mod:`fastmaml.engine.engine`) owns the inner loop and its reverse pass over [T, P]
iterates; a runner owns the model: one forward for every task, the support gradients
g_k = grad L_S(theta_k) [T, P], the weighted query gradient (w_k / T) grad L_Q(theta_k), and the
Hessian-vector product H_S(theta_k) u from the state that a support pass kept.

Two implementations:

* :class:`fastmaml.engine.fused_runner.FusedRunner`: the project's task-batched layer kernels
  (:mod:`fastmaml.layers`), the HVP by the R-operator, no autograd; the built-in losses only.
* :class:`fastmaml.engine.generic_runner.GenericRunner` (and ``GeneralRunner`` for several inputs
  and pytree targets): ``torch.func.vmap`` or a loop over tasks of the module, gradients and the
  HVP by autograd.

The engine picks one in its constructor (``Engine.runner``); a call that the fused runner cannot
run (a custom ``loss_fn``; BatchNorm in evaluation mode with running statistics) takes the
engine's generic runner, by name, in ``Engine.runner_for``.

Per-step parameters (MAML++'s per-step BatchNorm weights): every runner call runs at the inner step
of the enclosing :mod:`fastmaml.step_context`, which the engine sets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..functional import LossFn

# (g [T, P], L [T], the HVP state or None)
SupportGrad = Tuple[Tensor, Tensor, object]
# ((w / T) grad L_Q [T, P], L_Q [T] detached, predictions [T, M, ...], name -> (w / T) sum_t dL_Q,t/dphi)
QueryGrad = Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]


class Runner(ABC):
    """What the engine asks of the model on one path (module docstring)."""

    #: 'fused' or 'generic': the first word of ``Engine.path``
    kind: str
    #: its HVP states have a known size (store mode keeps them within the store budget); the
    #: generic runner's autograd graphs do not (store mode keeps the last step's only)
    measures_states: bool
    #: its HVP writes H u into a [T, P] buffer the caller keeps across the reverse pass
    writes_hvp_into_buffer: bool

    @abstractmethod
    def forward(self, flat: Tensor, x) -> Tensor:
        """Every task's outputs [T, M, ...] at the fast weights ``flat`` ([P] or [T, P])."""

    @abstractmethod
    def support_grad(self, theta_k: Tensor, x, y, loss_fn: Optional[LossFn], create_graph: bool,
                     grad_out: Optional[Tensor] = None) -> SupportGrad:
        """(g_k [T, P], L_S [T], state): ``state`` (when ``create_graph``) is what :meth:`hvp` needs.
        ``grad_out``: a [T, P] buffer that a runner may write g into."""

    @abstractmethod
    def query_grad(self, theta_k: Tensor, x, y, loss_fn: Optional[LossFn], scale: float,
                   shared_list: List[Tensor], shared_names: List[str]) -> QueryGrad:
        """``scale`` grad L_Q at theta_k for the adapted parameters [T, P] and the shared ones."""

    @abstractmethod
    def mean_query_grad(self, phi: Tensor, x, y, num_tasks: int, loss_fn: Optional[LossFn],
                        shared: Dict[str, Tensor]) -> QueryGrad:
        """iMAML's outer gradient: ((1/T) grad L_Q at phi [T, P], losses [T], predictions,
        {shared name: (1/T) sum_t dL_Q,t/dpsi}), every shared parameter present (zeros where unused)."""

    @abstractmethod
    def hvp(self, state, u: Tensor, shared_list: List[Tensor], shared_names: List[str],
            out: Optional[Tensor] = None, retain_graph: bool = False) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """(H_S u [T, P], per shared parameter sum_t d/dphi <g_t, u_t> or None). ``out``: a buffer
        for H u (:attr:`writes_hvp_into_buffer`); ``retain_graph``: the state serves another HVP."""

    @abstractmethod
    def state_bytes(self, state) -> int:
        """Bytes an HVP state holds beyond its iterate."""

    @abstractmethod
    def describe(self, device: torch.device) -> str:
        """What runs on ``device``: ``Engine.path``'s parenthesis."""

    def forget_trainable(self) -> None:
        """Some parameter's ``requires_grad`` changed (``MAML._check_model``)."""
