"""The task-batched meta-gradient engine (docs/design.md §2 and §3).

All T tasks advance together: fast weights are one [T, P] buffer, the model runs on all tasks in one
batched computation, and the inner updates and reverse steps are fused ops over [T, P]. The
meta-gradient comes from an explicit reverse pass instead of the unrolled autograd graph:

    v = (w_K / T) grad L_Q(theta_K)
    for k = K-1 .. 0:
        dJ/da_k  = -sum(v * g_k)                       (per scalar / segment / element of a_k)
        v        = v - H_S(theta_k) (a_k v)            (second order only)
        v        = v + (w_k / T) grad L_Q(theta_k)     (multi-step loss, k >= 1)
    dJ/dtheta = sum_t v

Parameters that the inner loop does not adapt (phi) collect ``(w_k/T) dL_Q/dphi`` at every weighted
step and, second order, ``-d/dphi <g_k, a_k v>`` from the same double backward as the HVP.

Two runners run the model for all tasks (:mod:`fastmaml.engine.runner`): the fused runner
(:mod:`fastmaml.engine.fused_runner`: the project's task-batched layer kernels, the HVP by the
R-operator, without autograd) for models made of the supported layers with the built-in losses, and
the generic runner (:mod:`fastmaml.engine.generic_runner`: vmap or a loop over tasks, autograd) for
anything else. The constructor picks ``Engine.runner`` once; ``Engine.runner_for`` names the two
cases where one call takes the generic runner instead (a custom ``loss_fn``; BatchNorm in evaluation
mode with running statistics), and ``Engine.path`` says which runs and why.

Per-step parameters (MAML++'s per-step BatchNorm weights, :mod:`fastmaml.step_context`): every
model call runs at an inner step: the support pass at theta_k (inner step k, its recomputations and
HVP included) at step k, the query pass at theta_k (k = 1..K, the multi-step terms and theta_K) at
step k - 1. The runners read it from the step context set here (the fused runner keeps it in its HVP
state). ``Engine.forward`` runs at the step it is given, or the
enclosing context's.

Memory (docs/design.md §5): ``store`` keeps the iterates theta_0..theta_{K-1} ([T, P] each), the
last step's HVP state (its support activations) and earlier steps' states while the iterates and the
states total at most the store budget (``Engine.store_budget`` bytes; default
:func:`fastmaml.memory_budget.default_store_budget`, a fraction of the memory available at the call).
A step whose state fits is never recomputed: the reverse pass then costs one R-forward and
R-backward per step. Steps beyond the budget are recomputed once in the reverse pass; when the
iterates alone exceed the budget (large K), only every ceil(sqrt(K))-th iterate is kept, as in
``recompute``, and the reverse pass keeps a recomputed segment's states while the rest of the budget
allows (each support pass then runs twice). ``recompute`` keeps about sqrt(K) checkpoints and the
memory of one step: the reverse pass recomputes one segment of c = ceil(sqrt(K)) steps at a time from
its checkpoint, and each step's state again for its HVP. ``Engine.memory_info`` says what the last
call kept.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from .. import bn_running
from .. import kernels
from .. import step_context
from ..functional import LossFn, TaskBatchedModel, is_classification, task_accuracy
from ..inner_lr import InnerLR
from ..layers.program import Unsupported
from ..layout import FlatLayout
from ..memory_budget import default_store_budget
from .fused_runner import FusedRunner
from .generic_runner import GeneralRunner, GenericRunner
from .results import EngineResult, InnerLoop
from .runner import Runner

MEMORY_MODES = ("store", "recompute")
BATCHING = ("auto", "fused", "vmap", "loop")


class Engine:
    """Holds what one model needs across meta-steps: its layout, its runners, the segments.

    ``runner`` (picked here, once): the fused runner when ``batching`` is 'auto' or 'fused' and the
    model compiles to the fused layers, else the generic runner; ``generic`` is the autograd runner on
    tensor inputs (``runner`` itself when that is generic), ``general`` the autograd runner for
    several inputs and pytree targets (``MAML.adapt`` / ``learner(fast, x)`` with such batches).
    ``keep_eval_batchnorm`` (``MAML(bn_stats="running")``): BatchNorm in evaluation mode normalizes
    with its running statistics, which only the generic runners do (:meth:`runner_for`)."""

    def __init__(self, model: nn.Module, layout: FlatLayout, inner_lr: InnerLR,
                 kernel_backend: Optional[str] = None, batching: str = "auto", *,
                 keep_eval_batchnorm: bool = False):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.model = model
        self.layout = layout
        self.inner_lr = inner_lr
        self.kernel_backend = kernel_backend
        self.keep_eval_batchnorm = keep_eval_batchnorm
        self._segments: Dict[torch.device, Tensor] = {}
        # store mode: bytes the kept iterates and HVP states may take (None: default_store_budget at each call)
        self.store_budget: Optional[int] = None
        self.memory_info: Optional[Dict[str, object]] = None  # what the last inner_loop kept
        # CPU scratch [T, P] buffers kept across meta-steps (name -> tensor): a fresh one is a fresh
        # mmap whose every page faults on first write (docs/design.md §5)
        self._scratch: Dict[str, Tensor] = {}
        fused: Optional[FusedRunner] = None
        self.fallback_reason = ""  # why ``runner`` is the generic one ("" when it is fused)
        if batching in ("auto", "fused"):
            try:
                fused = FusedRunner(model, layout, self._layer_backend())
            except Unsupported as e:
                if batching == "fused":
                    raise ValueError(f"batching='fused' cannot run this model: {e}") from None
                self.fallback_reason = str(e)
        else:
            self.fallback_reason = f"batching={batching!r} was asked for"
        generic_batching = "auto" if batching == "fused" else batching
        self.generic = GenericRunner(model, layout, generic_batching, keep_eval_batchnorm)
        self.general = GeneralRunner(model, layout, generic_batching, keep_eval_batchnorm)
        self.runner: Runner = fused if fused is not None else self.generic

    @property
    def batched(self) -> TaskBatchedModel:
        """The generic runner's task-batched model (autograd over the module, tensor inputs)."""
        return self.generic.batched

    def _layer_backend(self) -> str:
        return "auto" if self.kernel_backend in (None, "auto", "cuda") else self.kernel_backend

    # -- which runner a call takes -----------------------------------------------------------------
    def _eval_batchnorm_reason(self) -> str:
        """Why a call must take the generic runner for BatchNorm in evaluation mode ('' if it needn't)."""
        names = bn_running.eval_batchnorms(self.model) if self.keep_eval_batchnorm else []
        if not names:
            return ""
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return (f"BatchNorm in eval mode with bn_stats='running' ({', '.join(names[:3])}{more}) "
                "normalizes with running statistics; the fused path runs per-task batch statistics only")

    def runner_for(self, loss_fn: Optional[LossFn] = None) -> Runner:
        """The runner of one call: ``runner``, or the generic runner when the call needs autograd: a
        custom ``loss_fn`` (the fused runner computes the built-in losses), or BatchNorm modules in
        evaluation mode with ``keep_eval_batchnorm`` (the fused runner normalizes with batch statistics)."""
        if self.runner.kind != "fused":
            return self.runner
        if loss_fn is not None or self.keep_eval_batchnorm and bn_running.eval_batchnorms(self.model):
            return self.generic
        return self.runner

    def forget_trainable(self) -> None:
        """Some parameter's ``requires_grad`` changed: the fused program reads them again."""
        for runner in (self.runner, self.generic, self.general):
            runner.forget_trainable()

    def path(self, device: Optional[torch.device] = None, loss_fn: Optional[LossFn] = None) -> str:
        """One line: the path a meta-step takes, and why when it is the generic one."""
        runner = self.runner_for(loss_fn)
        dev = device or next(self.model.parameters()).device
        if runner.kind == "fused":
            return f"fused ({runner.describe(dev)})"
        why = (self._eval_batchnorm_reason() or self.fallback_reason
               or "a custom loss_fn (the fused path runs the built-in losses)")
        return f"generic ({runner.describe(dev)}): {why}"

    def forward(self, flat: Tensor, x: Tensor, step: Optional[int] = None, runner: Optional[Runner] = None) -> Tensor:
        """Every task's outputs [T, M, ...] (no graph on the fused path) at inner ``step`` (None: the
        enclosing step context's; only per-step parameters read it). After k inner updates the query
        forward's step is ``step_context.query_step(k)`` = max(k - 1, 0). ``runner``: default
        :meth:`runner_for` the built-in losses."""
        if step is not None:
            with step_context.inner_step(step):
                return self.forward(flat, x, runner=runner)
        return (runner or self.runner_for(None)).forward(flat, x)

    # -- pieces ---------------------------------------------------------------------------------
    def segments(self, device: torch.device) -> Tensor:
        if device not in self._segments:
            self._segments[device] = self.layout.segments(device)
        return self._segments[device]

    def shared_params(self) -> Dict[str, nn.Parameter]:
        adapted = set(self.layout.names)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in adapted}

    def theta(self) -> Tensor:
        params = dict(self.model.named_parameters())
        return self.layout.flatten(params[n].detach() for n in self.layout.names)

    def step_rate(self, k: int, lr: Tensor, device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
        """(a_k, the segment ids when a_k holds one rate per segment, else None) of inner step k."""
        rate, segmented = self.inner_lr.rate(k, lr)
        return rate, (self.segments(device) if segmented else None)

    def scratch(self, name: str, like: Tensor) -> Tensor:
        """A [T, P] buffer shaped like ``like`` whose contents are never read before they are written:
        on the CPU one kept across calls under ``name``; elsewhere a fresh one (the caching
        allocators already reuse memory)."""
        if like.device.type != "cpu":
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        buf = self._scratch.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._scratch[name] = torch.empty(like.shape, dtype=like.dtype)
        return buf

    def support_grad(self, theta_k: Tensor, x: Tensor, y: Tensor, loss_fn, create_graph: bool,
                     grad_out: Optional[Tensor] = None, runner: Optional[Runner] = None):
        """(g_k [T, P], L_S [T], state): the per-task support gradients at theta_k for all tasks;
        ``state`` (when ``create_graph``) is what the runner's ``hvp`` needs: the fused runner's stored
        passes, or the generic runner's graph (g with its graph, and the leaf theta_k it hangs from).
        Runs at the enclosing step context's step (the callers here set it to k). ``grad_out``: a
        [T, P] buffer the fused runner writes g into. ``runner``: default :meth:`runner_for` ``loss_fn``."""
        runner = runner or self.runner_for(loss_fn)
        return runner.support_grad(theta_k, x, y, loss_fn, create_graph, grad_out=grad_out)

    def resolved_store_budget(self, device: torch.device) -> int:
        """The store budget in bytes for a call on ``device``: ``store_budget``, else the default."""
        return self.store_budget if self.store_budget is not None else default_store_budget(device)

    def _iterate_bytes(self, T: int, like: Tensor) -> int:
        """Bytes of one [T, P] iterate."""
        return T * self.layout.numel * like.element_size()

    def forward_steps(self, theta_start: Tensor, k0: int, k1: int, x, y, loss_fn, lr, ops,
                      keep_states: Union[bool, str], support_losses: Optional[Tensor],
                      budget: float = 0.0, keep_grads: bool = True, runner: Optional[Runner] = None):
        """Run inner steps k0..k1-1 from theta_{k0}. Returns the iterates theta_{k0}..theta_{k1}, the
        support gradients g_{k0}..g_{k1-1} (None where ``keep_grads`` is False: [T, P] each, needed
        only by learned rates and callers with a reverse pass of their own), and ``kept``: step -> the
        HVP state of that step.

        ``keep_states``: False (none), 'last' (step k1-1: its HVP needs no recomputation), 'budget'
        (the last step, and earlier ones while their states, together with the iterates
        theta_{k0+1}..theta_{k1-1} that store mode keeps anyway, total at most ``budget`` bytes) or
        'fit' (any step while the states total at most ``budget``: the reverse pass's recomputation
        of one segment). ``runner``: default :meth:`runner_for` ``loss_fn``."""
        runner = runner or self.runner_for(loss_fn)
        iterates, grads, kept = [theta_start], [], {}
        theta = theta_start
        iterate_bytes = self._iterate_bytes(x.shape[0], theta_start)
        used = (k1 - k0 - 1) * iterate_bytes if keep_states == "budget" else 0
        g_bytes = iterate_bytes if keep_grads else 0
        T = x.shape[0]
        for k in range(k0, k1):
            last = keep_states in ("last", "budget") and k == k1 - 1
            keep = last or keep_states in ("budget", "fit") and budget > used
            # g_k dies in the inner update unless kept: then one scratch buffer serves every step
            out = None if keep_grads else self.scratch("g", theta.expand(T, -1) if theta.dim() == 1 else theta)
            with record_function("fastmaml.support_grad"), step_context.inner_step(k):
                g, losses, state = self.support_grad(theta, x, y, loss_fn, create_graph=keep, grad_out=out,
                                                     runner=runner)
            if support_losses is not None:
                support_losses[k] = losses.detach()
            if keep:
                cost = runner.state_bytes(state) + g_bytes
                if last or used + cost <= budget:
                    kept[k] = state
                    used += cost
            g = g.detach()
            grads.append(g if keep_grads else None)
            rate, seg = self.step_rate(k, lr, theta.device)
            theta = ops.inner_update(theta, g, rate, seg)
            iterates.append(theta)
        return iterates, grads, kept

    # -- the inner loop and its reverse pass ----------------------------------------------------
    def inner_loop(self, support_x: Tensor, support_y: Tensor, steps: int, first_order: bool,
                   loss_fn: Optional[LossFn] = None, memory: str = "store",
                   observe: Optional[Callable[[int, Tensor], None]] = None,
                   keep_grads: Optional[bool] = None, runner: Optional[Runner] = None) -> InnerLoop:
        """The K inner steps for all tasks from the meta-parameters: theta_K [T, P] (detached) and
        what ``reverse`` needs (the iterates or their checkpoints, the support gradients, and the
        stored HVP states, within the store budget).
        ``observe(k, theta_k)``, if given, sees every iterate once, k = 0..K in order, during these
        forward steps only (never the reverse pass's recomputations; ``fastmaml.bn_running``).
        ``keep_grads``: keep g_0..g_{K-1} in ``stored_grads`` (default: when the rates are learned).
        ``runner``: default :meth:`runner_for` ``loss_fn``; the reverse pass runs on the same one."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        K, T = steps, support_x.shape[0]
        theta0 = self.theta()
        dtype, device = theta0.dtype, theta0.device
        ops = kernels.ops_for(theta0, self.kernel_backend)
        lr = self.inner_lr.lr.detach().to(dtype)
        support_losses = torch.full((K, T), float("nan"), dtype=dtype, device=device)
        # the reverse pass reads g_k only for learned rates (dJ/da_k = -<v, g_k>); a caller with a
        # reverse pass of its own (ANIL) may ask for them
        keep_grads = self.inner_lr.learnable if keep_grads is None else keep_grads
        runner = runner or self.runner_for(loss_fn)
        # the fused runner's HVP states have a known size: store mode keeps them within the budget
        sized = runner.measures_states
        spacing = max(1, math.ceil(math.sqrt(K)))  # recompute mode's checkpoint spacing
        iterate_bytes = self._iterate_bytes(T, theta0)
        budget = self.resolved_store_budget(device) if memory == "store" else 0
        fallback = (memory == "store" and sized and not first_order and spacing < K
                    and (K - 1) * iterate_bytes > budget)
        if fallback:
            # The iterates alone outgrow the budget (large K): keep every c-th one as a checkpoint,
            # as recompute mode does, so that memory stays flat in K.
            memory = "recompute"
        c = K if memory == "store" else spacing
        checkpoints: List[Tensor] = [theta0]
        stored_grads: List[Tensor] = []
        kept: Dict[int, object] = {}
        theta = theta0
        for k0 in range(0, K, c):
            k1 = min(K, k0 + c)
            last = not first_order and k1 == K
            # the generic path keeps only the last step's autograd graph: its size is not known
            policy = ("budget" if sized and memory == "store" else "last") if last else False
            its, gs, kept_here = self.forward_steps(theta, k0, k1, support_x, support_y, loss_fn, lr, ops,
                                                    keep_states=policy, support_losses=support_losses,
                                                    budget=budget, keep_grads=keep_grads, runner=runner)
            kept.update(kept_here)
            if observe is not None:
                for j, it in enumerate(its[:-1]):
                    observe(k0 + j, it)
            if memory == "store":
                checkpoints, stored_grads = its[:-1], gs
            elif k1 < K:
                checkpoints.append(its[-1])
            else:
                stored_grads = gs[-1:]  # g_{K-1}: the reverse pass does not rerun the kept last step
            theta = its[-1]
        if theta.dim() == 1:
            theta = theta.expand(T, -1)
        if observe is not None:
            observe(K, theta)
        state_bytes = sum(runner.state_bytes(st) for st in kept.values())
        # what the reverse pass may keep of a recomputed segment's states: the budget's rest after the
        # checkpoints and the kept states when store mode fell back to checkpoints; none in recompute
        # mode (its memory stays that of one step)
        segment_budget = max(0, budget - len(checkpoints) * iterate_bytes - state_bytes) if fallback else 0
        self.memory_info = {
            "mode": memory,
            "steps": K,
            "budget_bytes": int(budget) if memory == "store" else None,
            "iterates_kept": len(checkpoints),
            "iterate_bytes": len(checkpoints) * iterate_bytes,
            "states_kept": sorted(kept),
            "state_bytes": state_bytes,
            "recomputed_steps": [] if first_order else [k for k in range(K) if k not in kept],
        }
        return InnerLoop(K, first_order, memory, loss_fn, support_x, support_y, lr, ops, c, checkpoints,
                         stored_grads, kept, theta, support_losses, segment_budget, runner)

    def reverse(self, loop: InnerLoop, v: Tensor,
                query_step: Optional[Callable[[Tensor, int], Optional[Tensor]]] = None, v_owned: bool = False):
        """The meta-gradient of an outer objective J whose gradient at theta_K is ``v`` [T, P]
        (docs/design.md §2): (dJ/dtheta [P], the shared parameters' terms
        {name: tensor}, dJ/dlr or None). ``query_step(theta_k, k)`` may add the gradient of J's terms at theta_k (the
        multi-step loss) for 1 <= k < K. ``loop`` is consumed (its stored states are released).
        ``v_owned``: v may be updated in place (else it is copied before its first update)."""
        K, c, ops, lr, runner = loop.steps, loop.c, loop.ops, loop.lr, loop.runner
        sx, sy, loss_fn = loop.support_x, loop.support_y, loop.loss_fn
        device = v.device
        shared = self.shared_params()
        shared_names, shared_list = list(shared.keys()), list(shared.values())
        shared_grads = [torch.zeros_like(p) for p in shared_list]
        learn_lr = self.inner_lr.learnable
        lr_grad = torch.zeros_like(lr) if learn_lr else None
        kept = loop.kept
        owned = v_owned  # is v a tensor of this pass (may be updated in place)?
        hv_buf: Optional[Tensor] = None  # the HVP's output (a runner that writes into one), reused across steps
        for k0 in reversed(range(0, K, c)):
            k1 = min(K, k0 + c)
            if loop.memory == "store":
                its, gs = loop.checkpoints, loop.stored_grads
            else:
                # recompute this segment from its checkpoint, keeping its states (second order) while
                # they fit the segment budget, for the HVPs below; a step whose state is kept already
                # (K - 1) is not rerun
                end = k1 - 1 if (k1 - 1) in kept else k1
                its, gs, states = self.forward_steps(loop.checkpoints[k0 // c], k0, end, sx, sy, loss_fn,
                                                     lr, ops, keep_states=False if loop.first_order else "fit",
                                                     support_losses=None, budget=loop.segment_budget,
                                                     keep_grads=learn_lr, runner=runner)
                kept.update(states)
                if end < k1:
                    gs = gs + loop.stored_grads
            for k in reversed(range(k0, k1)):
                theta_k = its[k - k0]
                rate, seg = self.step_rate(k, lr, device)
                hv = g = None
                if learn_lr:
                    g = gs[k - k0]
                if not loop.first_order:
                    state = kept.pop(k, None)
                    if state is None:
                        with record_function("fastmaml.support_grad"), step_context.inner_step(k):
                            g_k, _, state = self.support_grad(theta_k, sx, sy, loss_fn, create_graph=True,
                                                              runner=runner)
                        g = g_k.detach() if learn_lr else None
                    # H (a v) = a (H v) for one scalar rate a: the HVP runs on v itself and a is
                    # applied where H v is added to v (no [T, P] pass for a v); other rates scale v
                    scalar = seg is None and rate.dim() == 0 and not learn_lr
                    u = v if scalar else ops.scale(v, rate, seg)
                    if hv_buf is None and runner.writes_hvp_into_buffer:
                        hv_buf = self.scratch("hv", v)
                    with record_function("fastmaml.hvp"):
                        hv, terms = runner.hvp(state, u, shared_list, shared_names, out=hv_buf)
                    del state
                    for acc, gp in zip(shared_grads, terms):
                        if gp is not None:
                            acc.sub_(gp * rate if scalar else gp)
                gq = query_step(theta_k, k) if (query_step is not None and k >= 1) else None
                if learn_lr:
                    v, d_rate = ops.reverse_step(v, hv, g, gq, 1.0, rate, seg)
                    owned = True
                    self.inner_lr.accumulate(lr_grad, k, d_rate)
                else:
                    # v - hv + gq, rounded as reverse_step rounds it (w = 1); g only feeds dJ/da_k.
                    # In place once v is this pass's own tensor (the caller's v is never written).
                    if hv is not None:
                        if not owned:
                            v, owned = v.clone(), True
                        if scalar:
                            v.addcmul_(hv, rate, value=-1.0)  # v - a (H v), one pass, no host sync
                        else:
                            v.sub_(hv)
                    if gq is not None:
                        if owned:
                            v.add_(gq)
                        else:
                            v, owned = v + gq, True
        theta_grad = v.sum(0) if v.dim() == 2 else v
        return theta_grad, dict(zip(shared_names, shared_grads)), lr_grad

    # -- the meta-gradient -----------------------------------------------------------------------
    def meta_gradient(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        steps: int,
        first_order: bool,
        weights: Sequence[float],
        loss_fn: Optional[LossFn] = None,
        memory: str = "store",
        observe: Optional[Callable[[int, Tensor], None]] = None,
        runner: Optional[Runner] = None,
    ) -> EngineResult:
        """The meta-gradient of J = (1/T) sum_t sum_k w_k L_Q,t(theta_k) (module docstring), with the
        support and query losses and accuracy it measured. ``runner``: default :meth:`runner_for`."""
        K, T = steps, support_x.shape[0]
        runner = runner or self.runner_for(loss_fn)
        loop = self.inner_loop(support_x, support_y, steps, first_order, loss_fn, memory, observe, runner=runner)
        dtype, device = loop.theta_K.dtype, loop.theta_K.device
        query_all = torch.full((K + 1, T), float("nan"), dtype=dtype, device=device)
        shared = self.shared_params()
        shared_names, shared_list = list(shared.keys()), list(shared.values())
        query_shared = {n: torch.zeros_like(p) for n, p in shared.items()}

        @record_function("fastmaml.query_grad")
        def query_grad(theta_k: Tensor, k: int) -> Tuple[Tensor, Tensor]:
            """(w_k / T) grad L_Q at theta_k for the adapted and the shared parameters, at step k - 1."""
            with step_context.inner_step(step_context.query_step(k)):
                return _query_grad(theta_k, k)

        def _query_grad(theta_k: Tensor, k: int) -> Tuple[Tensor, Tensor]:
            scale = weights[k - 1] / T
            grad, losses, pred, shared_terms = runner.query_grad(theta_k, query_x, query_y, loss_fn, scale,
                                                                 shared_list, shared_names)
            query_all[k] = losses
            for name, gp in shared_terms.items():
                query_shared[name].add_(gp)
            return grad, pred

        v, pred_K = query_grad(loop.theta_K, K)
        objective_terms = [weights[K - 1] * query_all[K]]

        def query_step(theta_k: Tensor, k: int) -> Optional[Tensor]:
            if weights[k - 1] == 0.0:
                return None
            gq, _ = query_grad(theta_k, k)
            objective_terms.append(weights[k - 1] * query_all[k])
            return gq

        theta_grad, shared_grads, lr_grad = self.reverse(loop, v, query_step, v_owned=True)
        for name, gp in query_shared.items():
            shared_grads[name].add_(gp)
        objective = torch.stack(objective_terms).sum(0).mean()
        accuracy = task_accuracy(pred_K.detach(), query_y) if is_classification(query_y) else None
        return EngineResult(
            objective=objective,
            query_losses=query_all[K].clone(),
            query_accuracy=accuracy,
            support_losses=loop.support_losses,
            query_losses_all=query_all,
            theta_grad=theta_grad,
            shared_grads=shared_grads,
            lr_grad=lr_grad,
        )

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int, loss_fn=None,
              observe: Optional[Callable[[int, Tensor], None]] = None,
              runner: Optional[Runner] = None) -> Tuple[Tensor, Tensor]:
        """theta_K [T, P] (detached) and the support losses [K, T]; ``observe`` and ``runner`` as in
        ``inner_loop``."""
        theta0 = self.theta()
        ops = kernels.ops_for(theta0, self.kernel_backend)
        lr = self.inner_lr.lr.detach().to(theta0.dtype)
        losses = torch.full((steps, support_x.shape[0]), float("nan"), dtype=theta0.dtype, device=theta0.device)
        with torch.enable_grad():
            its, _, _ = self.forward_steps(theta0, 0, steps, support_x, support_y, loss_fn, lr, ops,
                                           keep_states=False, support_losses=losses, keep_grads=False,
                                           runner=runner)
        if observe is not None:
            for k, it in enumerate(its):
                observe(k, it)
        theta = its[-1]
        if theta.dim() == 1:
            theta = theta.expand(support_x.shape[0], -1)
        return theta.detach(), losses
