"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

The network is split into a body phi (every layer but the head) and a head theta (the last layer).
Only the head adapts in the inner loop; the body's features are fixed there, so the body runs ONCE
per task and set (support and query), not once per inner step as in MAML with a parameter filter:

    f_S = body_phi(x_S),  f_Q = body_phi(x_Q)                      (per task, per-task BatchNorm)
    theta_{k+1} = theta_k - a_k grad_theta L(theta_k; f_S, y_S)     (the engine's fused path, [T, P])
    J = (1/T) sum_t L(theta_K; f_Q, y_Q)

The meta-gradient still reaches the body: through f_Q directly, and through f_S, which enters every
support gradient of the head's inner loop. The reverse pass (docs/design.md §2) over the head gives
both, with one double backward per step taken with respect to the head's iterate AND the features:

    v = dJ/dtheta_K,  dJ/df_Q = (1/T) dL_Q/df_Q
    for k = K-1 .. 0:   (H u, d/df_S <g_k, u>) with u = a_k v;   v -= H u;   dJ/df_S -= d/df_S <g_k, u>
    dJ/dtheta_0 = sum_t v;  dJ/dphi = VJP of the body at (dJ/df_S, dJ/df_Q)

The head's inner loop runs on the engine (fused kernels when the head is made of supported layers),
its reverse pass on autograd over the head alone (a few thousand parameters), the body's backward
once. ``adapt`` / ``predict`` / ``evaluate`` are MAML's with the head as the adapted parameters
(the same numbers; they run the body at every step).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import kernels as kernel_ops
from ..engine import Engine
from ..functional import TaskBatchedModel, batch_statistics, is_classification, task_accuracy, task_losses
from ..layout import FlatLayout
from ..learner.meta_step_template import begin_meta_step, check_losses_finite, finish_meta_step
from ..maml import MAML, MetaStepOutput
from ..models import Conv4

__all__ = ["ANIL", "split_body_head"]


class _Conv4Body(nn.Module):
    """Conv4 without its classifier: the features, then flatten (max-pool) or the spatial mean."""

    def __init__(self, net: Conv4) -> None:
        super().__init__()
        self.features = net.features
        self.max_pool = net.max_pool

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return h.flatten(1) if self.max_pool else h.mean(dim=(2, 3))


def split_body_head(model: nn.Module, head: Union[int, str, None] = None) -> Tuple[nn.Module, nn.Module]:
    """(body, head) modules sharing the model's parameters.

    ``model``: :class:`fastmaml.models.Conv4` (head: ``classifier``) or an ``nn.Sequential``;
    ``head``: for a Sequential, the number of trailing children that form the head (default 1) or
    the name of the child where the head starts."""
    if isinstance(model, Conv4):
        if head not in (None, "classifier", 1):
            raise ValueError(f"ANIL on Conv4: the head is 'classifier', got head={head!r}")
        return _Conv4Body(model), nn.Sequential(model.classifier)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"ANIL needs an nn.Sequential (head = its last children) or fastmaml.models.Conv4, "
                        f"got {type(model).__name__}")
    children = list(model.named_children())
    if head is None:
        n = 1
    elif isinstance(head, str):
        names = [c for c, _ in children]
        if head not in names:
            raise ValueError(f"head={head!r} is not a child of the model; children: {names}")
        n = len(children) - names.index(head)
    elif isinstance(head, int) and not isinstance(head, bool):
        n = head
    else:
        raise TypeError(f"head must be an int (trailing children) or a child's name, got {head!r}")
    if not 1 <= n < len(children):
        raise ValueError(f"head: the head must be 1..{len(children) - 1} trailing children (the body needs "
                         f"at least one), got {n}")
    body = nn.Sequential(*[m for _, m in children[:-n]])
    head_mod = nn.Sequential(*[m for _, m in children[-n:]])
    return body, head_mod


class ANIL(MAML):
    """ANIL: the head adapts, the body is meta-learned through the head's inner loop.

    Args:
        model: ``nn.Sequential`` or :class:`fastmaml.models.Conv4`.
        head: which trailing part of the model is the head (see :func:`split_body_head`).
        inner_lr, inner_steps, first_order, learn_lr, lr_mode, kernels, batching: as for
            :class:`fastmaml.MAML` (the learning rates cover the head's tensors only).

    ``meta_step`` fills ``.grad`` of every trainable parameter: the head's from the reverse pass,
    the body's (BatchNorm affine parameters included) through the features. The multi-step loss and
    ``memory='recompute'`` are not offered (the head's iterates are tiny).
    """

    def __init__(self, model: nn.Module, inner_lr: Union[float, Sequence[float]] = 0.4, inner_steps: int = 1,
                 first_order: bool = False, learn_lr: bool = False, lr_mode: Optional[str] = None,
                 head: Union[int, str, None] = None, kernels: Optional[str] = None, batching: str = "auto") -> None:
        body, head_mod = split_body_head(model, head)
        head_ids = {id(p) for p in head_mod.parameters() if p.requires_grad}
        if not head_ids:
            raise ValueError("ANIL: the head has no trainable parameter")
        adapted = [n for n, p in model.named_parameters() if id(p) in head_ids]
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         learn_lr=learn_lr, lr_mode=lr_mode, adapt=adapted, kernels=kernels, batching=batching)
        self.body = body
        self.head = head_mod
        head_names = [n for n, p in head_mod.named_parameters() if p.requires_grad]
        self.head_layout = FlatLayout.of(head_mod, head_names)
        assert self.head_layout.shapes == self.layout.shapes, "head layout must match the adapted layout"
        self.head_engine = Engine(head_mod, self.head_layout, self.inner_lr, kernels, batching)
        # autograd over the head for the reverse pass: vmap (batched matmuls) wins for small heads
        self._head_batched = TaskBatchedModel(head_mod, self.head_layout, "vmap")
        # a head parameter frozen at construction would be adapted by an ANIL built once it is trainable
        head_all = {id(p) for p in head_mod.parameters()}
        self._adapt_candidates = frozenset(n for n, p in model.named_parameters() if id(p) in head_all)
        self._body_batching = "auto" if batching in ("auto", "fused") else batching
        self._build_body()

    def _build_body(self) -> None:
        """The body's layout over its trainable parameters (None when it has none) and its batched
        model; rebuilt when a body parameter's ``requires_grad`` changes (``MAML._check_model``)."""
        body_names = [n for n, p in self.body.named_parameters() if p.requires_grad]
        self.body_layout = FlatLayout.of(self.body, body_names) if body_names else None
        self._body_batched = (TaskBatchedModel(self.body, self.body_layout, self._body_batching)
                              if body_names else None)

    def _trainable_changed(self) -> None:
        super()._trainable_changed()
        self.head_engine.forget_trainable()
        self._build_body()

    # -- the body ------------------------------------------------------------------------------
    def features(self, x: Tensor, body_flat: Optional[Tensor] = None) -> Tensor:
        """The body's features of every task [T, N, F] (per-task BatchNorm statistics)."""
        if self._body_batched is None:
            with batch_statistics(self.body):
                return torch.stack([self.body(x[t]) for t in range(x.shape[0])])
        if body_flat is None:
            body_flat = self._body_flat()
        return self._body_batched.forward(body_flat, x)

    def _body_flat(self) -> Tensor:
        params = dict(self.body.named_parameters())
        return self.body_layout.flatten(params[n] for n in self.body_layout.names)

    # -- training ------------------------------------------------------------------------------
    def meta_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn=None, steps: Optional[int] = None) -> MetaStepOutput:
        """One ANIL meta-gradient for a batch of tasks, added to ``.grad`` (see the module docstring)."""
        steps, _, loss_fn = begin_meta_step(self, support_x, support_y, query_x, query_y, loss_fn, steps)
        grads, lr_grad, objective, q_losses, acc, s_losses = self._meta_gradient_anil(
            support_x, support_y, query_x, query_y, steps, loss_fn)
        check_losses_finite(s_losses, q_losses, "ANIL")
        finish_meta_step(self, grads, lr_grad)
        return MetaStepOutput(objective, q_losses, acc)

    def _meta_gradient_anil(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int, loss_fn):
        K, T = steps, sx.shape[0]
        body_flat = self._body_flat().detach().requires_grad_(True) if self.body_layout is not None else None
        with torch.enable_grad():
            f_s = self.features(sx, body_flat)
            f_q = self.features(qx, body_flat)
        fs_d, fq_d = f_s.detach(), f_q.detach()
        eng = self.head_engine
        # the inner loop: the engine, on the fixed support features (no HVP state kept: the reverse
        # below differentiates with respect to the features too)
        loop = eng.inner_loop(fs_d, sy, K, first_order=True, loss_fn=loss_fn, memory="store", keep_grads=True)
        ops, lr = loop.ops, loop.lr
        learn_lr = self.inner_lr.learnable
        lr_grad = torch.zeros_like(lr) if learn_lr else None
        # the query at theta_K: dJ/dtheta_K and dJ/df_Q
        with torch.enable_grad():
            th = loop.theta_K.detach().requires_grad_(True)
            fq_leaf = fq_d.clone().requires_grad_(True)
            pred_q = self._head_batched.forward(th, fq_leaf)
            q_losses = task_losses(pred_q, qy, loss_fn)
            v, d_fq = torch.autograd.grad(q_losses.sum() / T, [th, fq_leaf])
        d_fs = torch.zeros_like(fs_d)
        for k in reversed(range(K)):
            theta_k = loop.checkpoints[k]
            if theta_k.dim() == 1:
                theta_k = theta_k.expand(T, -1)
            rate, seg = eng.step_rate(k, lr, sx.device)
            g = loop.stored_grads[k]
            hv = None
            if not self.first_order:
                u = ops.scale(v, rate, seg)
                with torch.enable_grad():
                    leaf = theta_k.detach().clone().requires_grad_(True)
                    fs_leaf = fs_d.clone().requires_grad_(True)
                    losses = task_losses(self._head_batched.forward(leaf, fs_leaf), sy, loss_fn)
                    (gk,) = torch.autograd.grad(losses.sum(), leaf, create_graph=True)
                    hv, dfs_k = torch.autograd.grad(gk, [leaf, fs_leaf], grad_outputs=u)
                d_fs.sub_(dfs_k)
            v, d_rate = ops.reverse_step(v.contiguous(), None if hv is None else hv.contiguous(), g, None, 0.0,
                                         rate, seg)
            if learn_lr:
                self.inner_lr.accumulate(lr_grad, k, d_rate)
        grads = dict(self.layout.views(v.sum(0)))
        if body_flat is not None:
            (d_body,) = torch.autograd.grad([f_s, f_q], [body_flat], grad_outputs=[d_fs, d_fq], allow_unused=True)
            if d_body is None:
                d_body = torch.zeros_like(body_flat)
            body_views = self.body_layout.views(d_body)
            ids = {id(p): n for n, p in self.model.named_parameters()}
            bparams = dict(self.body.named_parameters())
            for bn, g_b in body_views.items():
                grads[ids[id(bparams[bn])]] = g_b
        acc = task_accuracy(pred_q.detach(), qy) if is_classification(qy) else None
        return grads, lr_grad, q_losses.detach().mean(), q_losses.detach(), acc, loop.support_losses
