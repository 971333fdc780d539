"""The public API: ``fastmaml.MAML``, a meta-learner around any ``nn.Module``.

The learner's other parts live in :mod:`fastmaml.learner` (checks, task chunks, the meta-step
template, running statistics); the meta-gradient is the engine's (:mod:`fastmaml.engine`) or the
per-task oracle's (:mod:`fastmaml.reference`).
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import bn_running
from .cuda_graph import GraphedMetaGradient
from .engine import MEMORY_MODES, Engine
from .functional import LossFn, is_classification, task_accuracy, task_losses
from .functional_api import adapt_with_graph, as_inputs, is_general, num_tasks, resolve_loss
from .inner_lr import InnerLR
from .layout import AdaptSpec, FlatLayout, check_unshared, matching_adapt, select_adapted
from .learner.chunking import chunk_size, combine_chunks, measure_peak, probe_chunk  # noqa: F401 (old imports)
from .learner.meta_step_template import accumulate_grad, accumulate_meta_gradient, begin_meta_step
from .learner.graph_replay import replay_meta_gradient
from .learner.outputs import FastWeights, LearnerIdentity, MetaStepOutput
from .learner.reference_backend import reference_adapt
from .learner.running_statistics import RunningStatisticsCalls
from .learner.validation import (LearnerChecks, check_number, check_task_chunk, check_weights,  # noqa: F401
                                 is_int, parse_bytes, shape_str)
from .param_record import ParamRecord
from .reference import maml as reference
from .step_context import inner_step, query_step

BACKENDS = ("engine", "reference")


class MAML(LearnerChecks, RunningStatisticsCalls, nn.Module):
    """Model-agnostic meta-learning with exact meta-gradients, batched over tasks.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs [N, ...] to outputs [N, ...].
        inner_lr: the inner learning rate, >= 0 and finite: a number (Python or numpy) or a 0-d
            tensor, or one per inner step (a sequence or a 1-d tensor).
        inner_steps: K, the number of inner SGD steps in training (an int, not a bool).
        first_order: drop the second-order term (FOMAML).
        learn_lr: make the inner learning rates parameters that receive ``.grad``.
        lr_mode: 'scalar', 'per_step', 'per_layer_per_step' (MAML++) or 'per_parameter'
            (Meta-SGD); default 'scalar' for a float ``inner_lr``, 'per_step' for a sequence.
        adapt: which parameters the inner loop adapts: None (all trainable ones, BatchNorm affine
            parameters only when ``adapt_bn``), a list of names, or a predicate ``(name, param)``.
            The others are still meta-learned, through the inner loop.
        adapt_bn: adapt BatchNorm's scale and shift (``weight``, ``bias``) in the inner loop. Default
            False, the MAML paper's choice: they are not in the fast weights, so every task's inner
            steps leave them at the meta-parameters' values, and they are meta-learned through the
            inner loop (their meta-gradient includes the second-order term through the adapted
            parameters). learn2learn and higher adapt every parameter: pass ``adapt_bn=True`` to get
            their meta-gradient (the default gives another one; on learn2learn's Omniglot example it
            differs by about 6%). Applies when ``adapt`` is None, to the parameters of every
            BatchNorm / InstanceNorm (``nn.modules.batchnorm._NormBase``) and ``PerStepBatchNorm``;
            an explicit ``adapt`` overrides it.
        multi_step_weights: w_1..w_K of the multi-step loss (MAML++), finite numbers >= 0; default:
            only w_K = 1.
        memory: 'store' (keep the K iterates, and the inner steps' HVP states within
            ``store_budget``) or 'recompute' (keep about sqrt(K) checkpoints and rerun the inner steps
            once in the reverse pass).
        store_budget: store mode's budget in bytes for the iterates and HVP states it keeps for the
            reverse pass (an int, or a string such as ``"2GiB"``): a step whose state fits is not
            recomputed, so the reverse pass costs one Hessian-vector product per step; beyond it, steps
            are recomputed, and when the K iterates alone do not fit, every ceil(sqrt(K))-th is kept
            as a checkpoint (memory stays bounded whatever K is). Default (None): 25% of the memory
            available at each call (``MemAvailable`` on the CPU, free memory on CUDA). The fused path
            spends it; the generic path keeps the last step's graph only. ``memory_info`` says what
            the last meta-step kept.
        backend: 'engine' (task-batched) or 'reference' (the per-task oracle).
        kernels: the fused-op backend for the engine ('auto', 'torch', 'cpp', 'cuda', 'triton');
            None follows ``fastmaml.kernels.set_backend``.
        batching: how the engine runs the model on T tasks at once: 'auto' (the fused path when
            the model is made of supported layers and the loss is the built-in one, else the
            generic path: loop for convolutional models on the CPU, vmap otherwise), 'fused' (the
            project's task-batched layer kernels with an analytic HVP; an error for an unsupported
            model), 'vmap' (one batched computation over autograd) or 'loop' (task after task over
            autograd).
            ``execution_path`` says which one runs, and for the generic path why.
        cuda_graph: record the engine's meta-step in a CUDA graph on its first call and replay it
            afterwards (``fastmaml/cuda_graph.py``): removes the CPU's launch overhead, which bounds
            small meta-steps on a GPU. Needs a CUDA model, the engine backend, and inputs of one shape
            from step to step (another shape records a new graph); results are identical to eager.
            With ``task_chunk``, one graph per chunk shape (the full chunks and the remainder).
        task_chunk: run the T tasks of a meta-step ``c`` at a time (None: all at once). Each chunk goes
            through the same engine (or reference) call and its meta-gradient, a mean over its own
            tasks, is weighted by c/T: the result is the unchunked meta-gradient up to rounding, and
            peak activation memory scales with c instead of T. An int >= 1 (values >= T run
            unchunked), or ``"auto"``: the largest c whose measured peak fits ``memory_budget`` (see
            :func:`probe_chunk`; measured once per input shape and cached).
        memory_budget: bytes that one chunk's meta-step may take on top of what is already held, for
            ``task_chunk="auto"``: an int, or a string such as ``"8GiB"``, ``"512MB"``; default: 80%
            of the free device memory on CUDA, 50% of the available memory (``MemAvailable``) on the
            CPU. Giving a budget with ``task_chunk=None`` means ``"auto"``.

        bn_stats: what BatchNorm normalizes with (:mod:`fastmaml.bn_running`):

            * ``"batch"`` (default): per-task batch statistics in training and evaluation mode alike
              (the MAML paper's transductive mode); running statistics are neither read nor updated.
            * ``"running"``: every BatchNorm must have ``track_running_stats=True`` (else a ValueError
              naming the module). A BatchNorm in training mode normalizes with per-task batch statistics
              exactly as ``"batch"`` does (same outputs, same meta-gradient) and its ``running_mean``,
              ``running_var`` and ``num_batches_tracked`` are updated as learn2learn's clones update
              the shared buffers when the same per-task loop runs, for task t = 0..T-1 in turn:
              support forward at theta_0 .. theta_{K-1}, then the query forward at theta_K (with
              ``multi_step_weights``: S_0, Q_1, S_1, ..., S_{K-1}, Q_K, the Q_k with w_k != 0). Each
              forward f, with per-channel batch mean m_f and unbiased variance v_f of the module's
              input (over the examples and spatial positions, [C] each): ``num_batches_tracked += 1``,
              ``r <- (1 - a) r + a s_f`` (s_f = m_f for ``running_mean``, v_f for ``running_var``;
              a = momentum, or 1 / num_batches_tracked when momentum is None). ``meta_step`` updates in that order;
              ``adapt`` (both ``create_graph``) records its support forwards task after task
              (t-major, then k), ``predict`` / ``learner(fast, x)`` their query forward per task, and
              ``evaluate`` interleaves per task as ``meta_step`` does. The updates are computed by a
              separate forward pass without autograd over the inner loop's iterates (the reverse
              pass's recomputations count nothing) and applied when the call succeeds (a refused call
              changes no buffer). A BatchNorm in evaluation mode (``learner.eval()``) normalizes with
              its running statistics and updates nothing, in ``adapt``, ``predict``, ``evaluate`` and
              ``meta_step`` alike; the fused path runs batch statistics only, so the engine then takes
              the generic path (``execution_path`` says why). Cost: one extra forward of every task
              per recorded pass, without autograd (fused kernels where the meta-step uses them); on
              the omniglot-5w1s training batch (T = 32, second order, float32, 1 CPU thread, fused
              path, ``bench/bench_bn_running.py``) a meta-step took +25% at K = 1 (2.92 vs 2.34 s)
              and +13% at K = 5 (16.7 vs 14.8 s) on a loaded 2-core machine. Not with
              ``cuda_graph=True`` (refused), and the reference backend refuses BatchNorm in
              evaluation mode (its oracle runs batch statistics only).

    Refused, with an error naming the module or argument (parameters and ``.grad`` unchanged):

    * a submodule or parameter registered under two names (tied weights), at construction;
    * a model changed after construction, at every call (``meta_step``, ``adapt``, ``predict``,
      ``learner(fast, x)``, ``evaluate``): a parameter replaced (a layer swapped for another), added,
      removed or reshaped, or an adapted parameter frozen (``requires_grad_(False)``) / a frozen one
      that would be adapted made trainable. Build a new learner (and optimizer) after such a change.
      A ``requires_grad`` change of a parameter that is not adapted is followed instead: it gets a
      meta-gradient, or none and no ``.grad``, as in a learner built after the change;
    * a module that draws random numbers in training mode (``Dropout`` with p > 0, ``RReLU``...), at
      ``meta_step`` and ``adapt``: the reverse pass recomputes support gradients, which would see
      other random masks than the inner steps did (and vmap refuses randomness), so the
      meta-gradient would be wrong. Put such modules in ``eval()`` mode. Randomness drawn inside
      ``forward`` by functional calls (``F.dropout(training=True)``) cannot be detected: don't.
    * targets of another shape than the predictions (float regression targets must have the
      prediction's shape ``[T, N, ...]``; class labels are int64 ``[T, N]``), NaN/Inf inputs,
      query examples of another shape than the support's, and a non-finite meta-gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: Union[float, Sequence[float]] = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        learn_lr: bool = False,
        lr_mode: Optional[str] = None,
        adapt: AdaptSpec = None,
        adapt_bn: bool = False,
        multi_step_weights: Optional[Sequence[float]] = None,
        memory: str = "store",
        backend: str = "engine",
        kernels: Optional[str] = None,
        batching: str = "auto",
        cuda_graph: bool = False,
        task_chunk: Union[None, int, str] = None,
        memory_budget: Union[None, int, str] = None,
        bn_stats: str = "batch",
        store_budget: Union[None, int, str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not is_int(inner_steps) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r} ({type(inner_steps).__name__})")
        inner_steps = int(inner_steps)
        for flag, value in (("first_order", first_order), ("learn_lr", learn_lr), ("adapt_bn", adapt_bn)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r} ({type(value).__name__})")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if kernels is not None:
            from .kernels import BACKENDS as KERNEL_BACKENDS

            if kernels not in KERNEL_BACKENDS:
                raise ValueError(f"kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {kernels!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and backend != "engine":
            raise ValueError(
                f"cuda_graph=True needs backend='engine' (the reference is a Python loop), got {backend!r}")
        if memory_budget is not None and task_chunk is None:
            task_chunk = "auto"
        self.task_chunk = check_task_chunk(task_chunk)
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget, "memory_budget")
        if self.memory_budget is not None and self.task_chunk != "auto":
            raise ValueError(f"memory_budget applies to task_chunk='auto' only, got task_chunk={task_chunk!r}")
        self._auto_chunk: Dict[Tuple, int] = {}
        self.chunk_info: Optional[Dict[str, object]] = None  # task_chunk="auto": what the probe measured
        self.model = model
        self.cuda_graph = cuda_graph
        self._graphed: Optional[GraphedMetaGradient] = None
        self._graphs: Dict[Hashable, GraphedMetaGradient] = {}  # by key; two at most (chunk and remainder)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.memory = memory
        self.backend = backend
        self.multi_step_weights = None if multi_step_weights is None else check_weights(multi_step_weights)
        if self.multi_step_weights is not None and len(self.multi_step_weights) != inner_steps:
            raise ValueError(
                f"multi_step_weights must have inner_steps={inner_steps} entries (w_1..w_K), "
                f"got {len(self.multi_step_weights)}"
            )
        check_unshared(model)
        if adapt is not None and not callable(adapt) and not isinstance(adapt, str):
            adapt = tuple(adapt)  # read twice below: a generator would be empty the second time
        self.layout = FlatLayout.of(model, select_adapted(model, adapt, adapt_bn))
        first = next(p for n, p in model.named_parameters() if n == self.layout.names[0])
        self.inner_lr = InnerLR(inner_lr, inner_steps, self.layout, lr_mode, learn_lr, first.dtype, first.device)
        # bn_stats="running": BatchNorm in eval mode normalizes with running statistics (generic runner)
        self.engine = Engine(model, self.layout, self.inner_lr, kernels, batching,
                             keep_eval_batchnorm=bn_stats == "running")
        self.store_budget = store_budget
        self.bn_stats = bn_running.check_bn_stats(bn_stats)
        if self.bn_stats == "running":
            bn_running.check_running(model)
            if cuda_graph:
                raise ValueError("cuda_graph=True with bn_stats='running' is not supported: the running statistics "
                                 "are recorded outside the engine's meta-step, which a CUDA graph replays as a whole; "
                                 "use cuda_graph=False or bn_stats='batch'")
        self._bn_recorder: Optional[bn_running.Recorder] = None
        self._out_features: Dict[Tuple, Tuple[int, ...]] = {}
        self._identity = LearnerIdentity()
        # the parameters it was built with, and those a learner built later would adapt once trainable
        self._params_built = ParamRecord(model)
        self._adapt_candidates = _adapt_candidates(model, adapt, adapt_bn)

    @property
    def adapted_names(self) -> Tuple[str, ...]:
        return self.layout.names

    @property
    def execution_path(self) -> str:
        """One line: 'fused (<kernels> layer kernels)', or 'generic (<batching>): <why>' naming the
        module (or the option) that made the engine fall back; 'reference' for the oracle."""
        if self.backend == "reference":
            return "reference (per-task loop over autograd)"
        return self.engine.path()

    @property
    def store_budget(self) -> Optional[int]:
        """Store mode's budget in bytes (None: the default, 25% of the memory available at each call)."""
        return self.engine.store_budget

    @store_budget.setter
    def store_budget(self, value: Union[None, int, str]) -> None:
        self.engine.store_budget = None if value is None else parse_bytes(value, "store_budget", least=0)

    @property
    def memory_info(self) -> Optional[Dict[str, object]]:
        """What the last meta-step's inner loop kept for its reverse pass (None before the first):
        ``mode`` ('store', or 'recompute' where store mode's iterates outgrew the budget),
        ``budget_bytes`` (store mode), ``iterates_kept`` and ``iterate_bytes``, ``states_kept`` (the
        steps whose HVP state was kept) and ``state_bytes``, ``recomputed_steps`` (the steps whose
        support pass the reverse pass reruns). With ``task_chunk``, the last chunk's."""
        info = self.engine.memory_info
        return None if info is None else dict(info)

    # -- checks (fastmaml/learner/validation.py) -------------------------------------------------
    def _trainable_changed(self) -> None:
        """``requires_grad`` of a parameter that is not adapted changed: forget what depends on it (the
        fused program's set of trainable parameters, recorded CUDA graphs, probed chunk sizes)."""
        self.engine.forget_trainable()
        self._graphs.clear()
        self._graphed = None
        self._auto_chunk.clear()

    # -- training ------------------------------------------------------------------------------
    def meta_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        loss_fn: Optional[LossFn] = None,
        steps: Optional[int] = None,
    ) -> MetaStepOutput:
        """One meta-gradient for a batch of tasks; adds it to ``.grad`` like ``backward()`` does.

        support_x [T, N*K, ...], support_y [T, N*K] (int64 labels, or float targets); query
        likewise. ``loss_fn(pred, target) -> scalar`` for one task (default: cross-entropy for
        int64 labels, mean squared error for float targets).
        """
        steps, weights, loss_fn = begin_meta_step(self, support_x, support_y, query_x, query_y, loss_fn, steps,
                                                  resolve=resolve_loss)
        T = support_x.shape[0]
        c = chunk_size(self, support_x, support_y, query_x, query_y, steps, weights, loss_fn)
        bounds = [(i, min(i + c, T)) for i in range(0, T, c)]
        # bn_stats="running": the BatchNorm statistics of each chunk's forwards, applied once all checks passed
        with self._bn_updates() as rec:
            results = [self._meta_gradient(support_x[a:b], support_y[a:b], query_x[a:b], query_y[a:b], steps, weights,
                                           loss_fn, len(bounds) > 1 and T % c != 0,
                                           None if rec is None else rec.observer(support_x[a:b], query_x[a:b], steps,
                                                                                 weights, a))
                       for a, b in bounds]
            r = results[0] if len(results) == 1 else combine_chunks(results, [(b - a) / T for a, b in bounds])
            self._check_finite(r.support_losses, r.query_losses_all, weights)
            if self.backend == "reference":
                grads = r.param_grads
            else:
                grads = dict(self.layout.views(r.theta_grad))
                grads.update(r.shared_grads)
            lr_grad = r.lr_grad
            self._check_meta_gradient(grads, lr_grad)
        accumulate_meta_gradient(self, grads, lr_grad)  # after the statistics are applied, as before
        return MetaStepOutput(r.objective, r.query_losses, r.query_accuracy)

    def _meta_gradient(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int, weights: Sequence[float],
                       loss_fn: Optional[LossFn], two_graphs: bool = False, observe=None):
        """One backend call on a batch (or chunk) of tasks: an EngineResult, or the reference's result.
        ``observe(k, theta_k)``: sees the inner loop's iterates (bn_stats='running')."""
        if self.backend == "reference":
            r = reference.meta_gradient(self.model, self.inner_lr, self.layout, sx, sy, qx, qy, steps,
                                        self.first_order, weights, loss_fn)
            if observe is not None:  # the oracle keeps no iterates: the per-task inner loop again
                reference_adapt(self, sx, sy, steps, loss_fn, observe)
            return r
        if self.cuda_graph:
            return replay_meta_gradient(self, sx, sy, qx, qy, steps, weights, loss_fn, 2 if two_graphs else 1)
        return self.engine.meta_gradient(sx, sy, qx, qy, steps, self.first_order, weights, loss_fn, self.memory,
                                         observe)

    # -- evaluation ----------------------------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None,
              loss_fn: Optional[LossFn] = None, create_graph: bool = False) -> FastWeights:
        """The fast weights of every task after ``steps`` inner steps (default: ``inner_steps``;
        0 gives the meta-parameters themselves, for the before-adaptation baseline).

        ``create_graph=True``: the fast weights stay connected to the meta-parameters (the adapted
        ones, learnable inner rates, and the parameters the inner loop does not adapt): build any outer
        objective from ``learner(fast, query_x)`` and call ``backward()`` once; its backward is the
        engine's reverse pass (second order unless ``first_order``), so memory is bounded by the store
        budget, not by the steps. ``create_graph=False`` (default): detached fast weights, as before.

        General losses (see :mod:`fastmaml.functional_api`): ``support_x`` may be a tuple of tensors
        [T, N, ...] (a model with several inputs), ``support_y`` any pytree of [T, ...] tensors (targets
        with masks, extra data) read by ``loss_fn(pred, batch)``, called per task (vmapped, or task
        after task when vmap cannot run it). ``nn.CrossEntropyLoss()`` / ``nn.MSELoss()`` with default
        settings run as the built-in losses.

        ``bn_stats="running"``, BatchNorm in training mode: the running statistics are updated with the
        support forwards at theta_0..theta_{K-1}, task after task (t-major, then k), when adapt
        succeeds; in evaluation mode the inner steps normalize with the running statistics."""
        self._check_model("adapt")
        steps = self._steps(steps, least=0)
        self._check_deterministic("adapt")
        self._check_reference_eval("adapt")
        if not isinstance(create_graph, bool):
            raise TypeError(f"create_graph must be a bool, got {create_graph!r} ({type(create_graph).__name__})")
        loss_fn = resolve_loss(loss_fn, support_y)
        if is_general(support_x, support_y):
            return self._adapt_general(support_x, support_y, steps, loss_fn, create_graph)
        self._check_inputs((("support_x", support_x, "support_y", support_y),), loss_fn)
        with self._bn_updates() as rec:
            observe = None if rec is None else rec.observer(support_x, None, steps)
            if create_graph:
                if self.backend == "reference":
                    raise ValueError("adapt(create_graph=True) runs on backend='engine' (its backward is the "
                                     "engine's reverse pass); the reference backend is the per-task oracle of "
                                     "meta_step")
                # a custom loss runs per task, vmapped or task after task (the general runner)
                runner = self.engine.runner_for(None) if loss_fn is None else self.engine.general
                flat, losses = adapt_with_graph(self, self.engine, support_x, support_y, steps, loss_fn, self.memory,
                                                observe, runner)
            elif self.backend == "reference":
                flat, losses = reference_adapt(self, support_x, support_y, steps, loss_fn, observe)
            else:
                flat, losses = self.engine.adapt(support_x, support_y, steps, loss_fn, observe)
            if not bool(torch.isfinite(losses).all()):
                k, t = (int(i) for i in (~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"non-finite support loss at inner step {k} of task {t}")
            if not bool(torch.isfinite(flat).all()):
                raise FloatingPointError("non-finite fast weights after the inner steps although the support losses "
                                         "are finite (an inner_lr or inputs too large?)")
        return FastWeights(flat, losses, self._identity, self.layout, tuple(support_x.shape[2:]))

    def _adapt_general(self, sx, sy, steps: int, loss_fn, create_graph: bool) -> FastWeights:
        if self.backend == "reference":
            raise ValueError("several inputs and targets other than one tensor run on backend='engine'")
        sx = as_inputs(sx)
        ref = self._reference_param()
        T = num_tasks((sx, sy))
        if T == 0:
            raise ValueError("the task batch is empty (T = 0)")
        for t in pytree.tree_leaves((sx, sy)):
            if isinstance(t, Tensor) and t.device != ref.device:
                raise ValueError(f"an input or target is on {t.device} but the model is on {ref.device}")
        general = self.engine.general
        with self._bn_updates(general) as rec:
            observe = None if rec is None else rec.observer(sx, None, steps)
            if create_graph:
                flat, losses = adapt_with_graph(self, self.engine, sx, sy, steps, loss_fn, self.memory, observe, general)
            else:
                flat, losses = self.engine.adapt(sx, sy, steps, loss_fn, observe, runner=general)
            if not bool(torch.isfinite(losses).all()):
                k, t = (int(i) for i in (~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"non-finite support loss at inner step {k} of task {t}")
        example = tuple(sx.shape[2:]) if isinstance(sx, Tensor) else None
        return FastWeights(flat, losses, self._identity, self.layout, example)

    def forward(self, fast: FastWeights, x) -> Tensor:
        """``learner(fast, x)``: outputs [T, M, ...] of each task's adapted model on x [T, M, ...] (or
        a tuple of such inputs), differentiable with respect to ``fast.flat`` (when ``adapt`` ran with
        ``create_graph=True``: the meta-parameters) and the parameters that are not adapted. Without
        autograd (``torch.no_grad()``), the same as :meth:`predict`. ``bn_stats="running"``: as
        :meth:`predict` (running statistics in evaluation mode; in training mode this forward's batch
        statistics update them, task after task)."""
        self._check_model("forward")
        self._check_fast(fast)
        x = as_inputs(x)
        T = fast.num_tasks
        if num_tasks(x) != T:
            raise ValueError(f"x has {num_tasks(x)} tasks but fast holds {T} tasks' weights")
        graph = torch.is_grad_enabled() and (fast.flat.requires_grad
                                             or any(p.requires_grad for p in self.model.parameters()))
        if not graph and isinstance(x, Tensor):
            return self.predict(fast, x)
        if isinstance(x, Tensor):
            self._check_x("x", x, self._reference_param())
            if fast.example_shape is not None and tuple(x.shape[2:]) != tuple(fast.example_shape):
                want = "[" + ", ".join(str(s) for s in fast.example_shape) + "]"
                raise ValueError(f"x has examples of shape {shape_str(x[0, 0])} but the support set's are {want}")
            runner, batched = self.engine.runner_for(None), self.engine.batched
        else:
            runner = self.engine.general
            batched = runner.batched
        step = query_step(fast.support_losses.shape[0])  # after K updates: step K - 1
        with self._bn_updates(runner) as rec:
            with inner_step(step):
                out = batched.forward(fast.flat, x)
            if rec is not None:
                rec.record(fast.flat, x, step)
        return out

    @torch.no_grad()
    def predict(self, fast: FastWeights, x: Tensor) -> Tensor:
        """Outputs [T, M, ...] of each task's adapted model on its inputs x [T, M, ...].

        ``fast`` must come from this learner's ``adapt``; x gets the checks of ``meta_step``'s inputs
        (device, dtype, finite values, T tasks, examples of the support set's shape).

        ``bn_stats="running"``: BatchNorm in evaluation mode normalizes with its running statistics
        (on the generic path); in training mode with the batch's, per task, and the running
        statistics are updated with this forward's, task after task."""
        self._check_model("predict")
        self._check_fast(fast)
        ref = self._reference_param()
        self._check_x("x", x, ref)
        T = fast.num_tasks
        if x.shape[0] != T:
            raise ValueError(f"x has {x.shape[0]} tasks (shape {shape_str(x)}) but fast holds {T} tasks' weights")
        if x.shape[1] == 0:
            raise ValueError(f"x is empty: every task needs at least one example, got shape {shape_str(x)}")
        if fast.example_shape is not None and tuple(x.shape[2:]) != tuple(fast.example_shape):
            want = "[" + ", ".join(str(s) for s in fast.example_shape) + "]"
            raise ValueError(f"x has examples of shape {shape_str(x[0, 0])} but the support set's are {want}")
        self._check_finite_input("x", x)
        # the query pass after K updates runs at inner step K - 1 (per-step BatchNorm weights)
        step = query_step(fast.support_losses.shape[0])
        runner = self.engine.runner_for(None)
        with self._bn_updates(runner) as rec:
            out = self.engine.forward(fast.flat, x, step=step, runner=runner)
            if rec is not None:
                rec.record(fast.flat, x, step)
        return out

    @torch.no_grad()
    def evaluate(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                 steps: Optional[int] = None, loss_fn: Optional[LossFn] = None) -> MetaStepOutput:
        """Adapt on the support sets, then the query loss (and accuracy) of every task.

        ``bn_stats="running"``, BatchNorm in training mode: the running statistics are updated in the
        per-task order of ``meta_step`` (task t: support forwards at theta_0..theta_{K-1}, then the query
        forward), once both passes succeeded."""
        self._check_model("evaluate")
        self._check_inputs((("support_x", support_x, "support_y", support_y), ("query_x", query_x, "query_y", query_y)),
                           loss_fn)
        with self._bn_updates():
            fast = self.adapt(support_x, support_y, steps, loss_fn)
            pred = self.predict(fast, query_x)
        losses = task_losses(pred, query_y, loss_fn)
        acc = task_accuracy(pred, query_y) if is_classification(query_y) else None
        return MetaStepOutput(losses.mean(), losses, acc)



def _adapt_candidates(model: nn.Module, adapt: AdaptSpec, adapt_bn: bool) -> frozenset:
    """Names of the parameters that the selection ``adapt`` / ``adapt_bn`` takes when trainable (frozen
    ones included): what a learner built after a parameter is unfrozen would adapt."""
    return frozenset(matching_adapt(model, adapt, adapt_bn, list(model.named_parameters())))


_accumulate = accumulate_grad  # the old private name
