"""iMAML: implicit meta-gradients (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019).

Inner problem of task t, proximal to the meta-parameters theta (lambda > 0):

    phi_t* = argmin_phi  L_S,t(phi) + (lambda / 2) ||phi - theta||^2

solved approximately by K steps of gradient descent, all T tasks at once as [T, P] (the engine's
support gradients, the fused ``inner_update`` op):

    phi_{k+1} = phi_k - a_k (grad L_S(phi_k) + lambda (phi_k - theta))

The implicit meta-gradient needs no unrolled loop (memory does not depend on K): with
H_t = Hessian of L_S,t at phi_t and g_Q,t = grad L_Q,t(phi_t),

    dJ/dtheta = (1/T) sum_t x_t,    (I + H_t / lambda) x_t = g_Q,t

solved by ONE conjugate gradient for all T tasks: each iteration is one task-batched HVP (the
engine's; analytic R-operator on the fused path) and two fused passes over [T, P]
(``fastmaml_cg::cg_step`` and ``cg_direction``, :mod:`fastmaml.kernels.cg`); a task whose residual
is below ``cg_tol * ||g_Q,t||`` stops (its coefficients are 0) while the others go on. Parameters the
inner loop does not adapt (BatchNorm's affine ones by default) get, exactly for the same phi_t,

    dJ/dpsi = (1/T) sum_t [ dL_Q,t/dpsi - (1/lambda) d/dpsi <grad_phi L_S,t, x_t> ]

(one more batched double backward / R-pass with direction x_t / lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import kernels as kernel_ops
from ..functional import is_classification, task_accuracy
from ..kernels import cg as cg_kernels
from ..learner.meta_step_template import begin_meta_step, check_losses_finite, finish_meta_step
from ..maml import MAML, FastWeights, MetaStepOutput

__all__ = ["IMAML", "CGInfo", "batched_cg"]


@dataclass
class CGInfo:
    """How the last conjugate gradient went: per task, its iterations and relative residual."""

    iterations: Tensor     # [T] int64
    residual: Tensor       # [T] ||b - A x|| / ||b||
    converged: Tensor      # [T] bool (residual <= tol)


def batched_cg(apply_a, b: Tensor, iterations: int, tol: float, backend: Optional[str] = None
               ) -> Tuple[Tensor, CGInfo]:
    """Solve A_t x_t = b_t for every row t of b [T, P] by conjugate gradient, all rows at once.

    ``apply_a(p) -> [T, P]`` applies every task's symmetric positive definite A_t to its row of p.
    A row stops when ||r_t|| <= tol ||b_t|| (or when p A p <= 0: A_t is not positive definite
    along p; the row keeps its last iterate)."""
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"CG iterations must be an int >= 1, got {iterations!r}")
    T = b.shape[0]
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rs = (r * r).sum(1)
    bnorm2 = rs.clone()
    thresh = (tol * tol) * bnorm2
    count = torch.zeros(T, dtype=torch.int64, device=b.device)
    active = rs > thresh
    zero = torch.zeros_like(rs)
    for _ in range(iterations):
        if not bool(active.any()):
            break
        Ap = apply_a(p)
        pAp = (p * Ap).sum(1)
        ok = active & (pAp > 0)
        alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)), zero)
        x, r, rs_new = cg_kernels.cg_step(x, r, p, Ap, alpha, backend)
        beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)), zero)
        p = cg_kernels.cg_direction(r, p, beta, backend)
        count += ok.to(torch.int64)
        rs = torch.where(ok, rs_new, rs)
        active = ok & (rs > thresh)
    resid = torch.sqrt(rs / torch.where(bnorm2 > 0, bnorm2, torch.ones_like(bnorm2)))
    return x, CGInfo(count, resid, rs <= thresh)


class IMAML(MAML):
    """Implicit MAML, batched over tasks.

    Args:
        model: any ``nn.Module`` (supported layers run on the fused path with the analytic HVP).
        inner_lr: the inner gradient-descent step size a (a number, or one per step).
        inner_steps: K, inner steps on the proximal objective.
        lam: lambda > 0, the proximal regularization strength.
        cg_steps: conjugate-gradient iterations (>= 1).
        cg_tol: a task's CG stops at relative residual ``cg_tol``.
        adapt_bn, kernels, batching: as for :class:`fastmaml.MAML`.
        cg_kernels: backend of the CG vector ops ('auto', 'cpp', 'torch').

    ``meta_step`` adds the implicit meta-gradient to ``.grad``; ``last_cg`` holds the
    :class:`CGInfo` of the last call. ``adapt`` (and so ``evaluate``) runs the same proximal
    inner loop from the meta-parameters.
    """

    def __init__(self, model: nn.Module, inner_lr: Union[float, Sequence[float]] = 0.1, inner_steps: int = 5,
                 lam: float = 1.0, cg_steps: int = 5, cg_tol: float = 1e-10, adapt_bn: bool = False,
                 kernels: Optional[str] = None, batching: str = "auto", cg_kernels: Optional[str] = None) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"iMAML: lam (the proximal regularization lambda) must be a finite number > 0, "
                             f"got {lam!r}")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"iMAML: cg_steps (conjugate-gradient iterations) must be an int >= 1, got {cg_steps!r}")
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not 0 <= cg_tol < math.inf:
            raise ValueError(f"iMAML: cg_tol must be a finite number >= 0, got {cg_tol!r}")
        if cg_kernels not in (None,) + cg_kernels_module().CG_BACKENDS:
            raise ValueError(f"cg_kernels must be one of {', '.join(cg_kernels_module().CG_BACKENDS)}, "
                             f"got {cg_kernels!r}")
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=False, adapt_bn=adapt_bn,
                         kernels=kernels, batching=batching)
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.cg_tol = float(cg_tol)
        self.cg_kernels = cg_kernels
        self.last_cg: Optional[CGInfo] = None

    # -- the proximal inner loop ---------------------------------------------------------------
    def _inner(self, sx: Tensor, sy: Tensor, steps: int, loss_fn=None) -> Tuple[Tensor, Tensor, Tensor]:
        """(theta [P], phi_K [T, P], support losses [K, T])."""
        eng = self.engine
        theta = eng.theta()
        ops = kernel_ops.ops_for(theta, eng.kernel_backend)
        lr = self.inner_lr.lr.detach().to(theta.dtype)
        T = sx.shape[0]
        losses = torch.full((steps, T), float("nan"), dtype=theta.dtype, device=theta.device)
        phi = theta.expand(T, -1)
        for k in range(steps):
            with torch.enable_grad():
                g, l_k, _ = eng.support_grad(phi, sx, sy, loss_fn, create_graph=False)
            losses[k] = l_k.detach()
            prox = torch.add(g.detach(), phi - theta, alpha=self.lam)
            rate, seg = eng.step_rate(k, lr, theta.device)
            phi = ops.inner_update(phi.contiguous(), prox.contiguous(), rate, seg)
        return theta, phi, losses

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None, loss_fn=None,
              create_graph: bool = False) -> FastWeights:
        """Every task's phi after ``steps`` proximal inner steps (0: the meta-parameters)."""
        if create_graph:
            raise ValueError("IMAML.adapt(create_graph=True) is not offered: iMAML's meta-gradient is implicit "
                             "(use meta_step)")
        self._check_model("adapt")
        steps = self._steps(steps, least=0)
        self._check_inputs((("support_x", support_x, "support_y", support_y),), loss_fn)
        with torch.no_grad():
            if steps == 0:
                flat = self.engine.theta().expand(support_x.shape[0], -1)
                losses = torch.zeros(0, support_x.shape[0], dtype=flat.dtype, device=flat.device)
            else:
                _, flat, losses = self._inner(support_x, support_y, steps, loss_fn)
        return FastWeights(flat.detach(), losses, self._identity, self.layout, tuple(support_x.shape[2:]))

    # -- the implicit meta-gradient ------------------------------------------------------------
    def _hvp_fn(self, state, runner):
        """u [T, P] -> (H u, shared terms) on the runner that made ``state``; reusable across CG
        iterations (the state is kept: ``retain_graph``)."""
        shared = self.engine.shared_params()
        names, plist = list(shared), list(shared.values())

        def apply(u: Tensor, with_shared: bool = False):
            hv, terms = runner.hvp(state, u.contiguous(), plist if with_shared else [], names if with_shared else [],
                                   retain_graph=True)
            return (hv if hv is not None else torch.zeros_like(u)), terms

        return apply, names

    def _query(self, phi: Tensor, qx: Tensor, qy: Tensor, T: int, loss_fn):
        """((1/T) grad L_Q at phi [T, P], {shared: (1/T) sum dL_Q/dpsi}, losses [T], predictions)."""
        eng = self.engine
        shared = eng.shared_params()
        grad, losses, pred, sh = eng.runner_for(loss_fn).mean_query_grad(phi, qx, qy, T, loss_fn, shared)
        return grad, sh, losses, pred

    def implicit_gradient(self, support_x: Tensor, support_y: Tensor, phi: Tensor, b: Tensor, loss_fn=None,
                          shared_rhs: bool = True):
        """x [T, P] solving (I + H_t/lambda) x_t = b_t at phi by the batched CG, the shared parameters'
        terms -(1/lambda) sum_t d/dpsi <g_t, x_t> (when ``shared_rhs``), and the CG's :class:`CGInfo`."""
        runner = self.engine.runner_for(loss_fn)
        with torch.enable_grad():
            _, _, state = self.engine.support_grad(phi.detach(), support_x, support_y, loss_fn, create_graph=True)
        apply, names = self._hvp_fn(state, runner)
        lam = self.lam

        def apply_a(p: Tensor) -> Tensor:
            hv, _ = apply(p)
            return torch.add(p, hv, alpha=1.0 / lam)

        x, info = batched_cg(apply_a, b.contiguous(), self.cg_steps, self.cg_tol,
                             cg_kernels_module().cg_backend(b, self.cg_kernels))
        terms: Dict[str, Tensor] = {}
        if shared_rhs and names:
            _, t_list = apply(x / lam, with_shared=True)
            for n, t in zip(names, t_list):
                if t is not None:
                    terms[n] = -t
        return x, terms, info

    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn=None, steps: Optional[int] = None) -> MetaStepOutput:
        """The implicit meta-gradient of a task batch, added to ``.grad`` (see the module docstring)."""
        steps, _, loss_fn = begin_meta_step(self, support_x, support_y, query_x, query_y, loss_fn, steps)
        T = support_x.shape[0]
        _, phi, s_losses = self._inner(support_x, support_y, steps, loss_fn)
        gq, q_shared, q_losses, pred = self._query(phi, query_x, query_y, T, loss_fn)
        check_losses_finite(s_losses, q_losses, "iMAML")
        x, terms, info = self.implicit_gradient(support_x, support_y, phi, gq, loss_fn)
        self.last_cg = info
        grads: Dict[str, Tensor] = dict(self.layout.views(x.sum(0)))
        for n, g in q_shared.items():
            grads[n] = g + terms[n] if n in terms else g
        finish_meta_step(self, grads)
        acc = task_accuracy(pred, query_y) if is_classification(query_y) else None
        return MetaStepOutput(q_losses.mean(), q_losses, acc)


def cg_kernels_module():
    return cg_kernels
