"""The public API: ``fastmaml.MAML``, a meta-learner around any ``nn.Module``."""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import bn_running
from .cuda_graph import GraphedMetaGradient, graph_key
from .engine import MEMORY_MODES, Engine, EngineResult
from .functional import LossFn, TaskBatchedModel, batch_statistics, is_classification, task_accuracy, task_losses
from .functional_api import GeneralEngine, adapt_with_graph, as_inputs, is_general, num_tasks, resolve_loss
from .inner_lr import InnerLR
from .layout import AdaptSpec, FlatLayout, check_unshared, matching_adapt, select_adapted
from .memory_budget import default_memory_budget
from .param_record import ParamRecord
from .reference import maml as reference
from .step_context import inner_step, query_step

BACKENDS = ("engine", "reference")


@dataclass
class MetaStepOutput:
    """What one meta-step measured (all detached).

    loss: the meta-objective J (mean over tasks of the weighted query losses), 0-d.
    task_losses: [T] query loss of each task after the inner steps.
    task_accuracy: [T] query accuracy after the inner steps (classification), else None.
    """

    loss: Tensor
    task_losses: Tensor
    task_accuracy: Optional[Tensor]


@dataclass
class FastWeights:
    """The adapted parameters of T tasks: ``flat`` [T, P], in the learner's layout.

    ``learner`` identifies the MAML learner whose ``adapt`` made them (with its parameter layout),
    ``example_shape`` the shape of one support example: ``predict`` refuses fast weights of another
    learner and inputs of another shape.
    """

    flat: Tensor
    support_losses: Tensor  # [K, T]
    learner: Optional[object] = field(default=None, repr=False, compare=False)
    layout: Optional[FlatLayout] = field(default=None, repr=False, compare=False)
    example_shape: Optional[Tuple[int, ...]] = None

    @property
    def num_tasks(self) -> int:
        return self.flat.shape[0]


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


class MAML(nn.Module):
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
        if not _is_int(inner_steps) or inner_steps < 1:
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
        self.task_chunk = _check_task_chunk(task_chunk)
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
        self.multi_step_weights = None if multi_step_weights is None else _check_weights(multi_step_weights)
        if self.multi_step_weights is not None and len(self.multi_step_weights) != inner_steps:
            raise ValueError(
                f"multi_step_weights must have inner_steps={inner_steps} entries (w_1..w_K), "
                f"got {len(self.multi_step_weights)}"
            )
        check_unshared(model)
        self.layout = FlatLayout.of(model, select_adapted(model, adapt, adapt_bn))
        first = next(p for n, p in model.named_parameters() if n == self.layout.names[0])
        self.inner_lr = InnerLR(inner_lr, inner_steps, self.layout, lr_mode, learn_lr, first.dtype, first.device)
        self.engine = Engine(model, self.layout, self.inner_lr, kernels, batching)
        self.store_budget = store_budget
        self.bn_stats = bn_running.check_bn_stats(bn_stats)
        if self.bn_stats == "running":
            bn_running.check_running(model)
            if cuda_graph:
                raise ValueError("cuda_graph=True with bn_stats='running' is not supported: the running statistics "
                                 "are recorded outside the engine's meta-step, which a CUDA graph replays as a whole; "
                                 "use cuda_graph=False or bn_stats='batch'")
            self.engine.batched.bn_keep_eval = True
        self._bn_recorder: Optional[bn_running.Recorder] = None
        self._out_features: Dict[Tuple, Tuple[int, ...]] = {}
        self._identity = _LearnerIdentity()
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
        return self._engine().path()

    @property
    def store_budget(self) -> Optional[int]:
        """Store mode's budget in bytes (None: the default, 25% of the memory available at each call)."""
        return self.engine.store_budget

    @store_budget.setter
    def store_budget(self, value: Union[None, int, str]) -> None:
        budget = None if value is None else parse_bytes(value, "store_budget", least=0)
        for eng in (self.engine, self.__dict__.get("_bn_eval_engine")):
            if eng is not None:
                eng.store_budget = budget

    @property
    def memory_info(self) -> Optional[Dict[str, object]]:
        """What the last meta-step's inner loop kept for its reverse pass (None before the first):
        ``mode`` ('store', or 'recompute' where store mode's iterates outgrew the budget),
        ``budget_bytes`` (store mode), ``iterates_kept`` and ``iterate_bytes``, ``states_kept`` (the
        steps whose HVP state was kept) and ``state_bytes``, ``recomputed_steps`` (the steps whose
        support pass the reverse pass reruns). With ``task_chunk``, the last chunk's."""
        info = self._engine().memory_info
        return None if info is None else dict(info)

    # -- BatchNorm running statistics (bn_stats="running") ----------------------------------------
    def _eval_batchnorms(self) -> List[str]:
        """bn_stats='running': the BatchNorm modules in evaluation mode (they normalize with running
        statistics); always [] for bn_stats='batch'."""
        if self.bn_stats != "running":
            return []
        return bn_running.eval_batchnorms(self.model)

    def _engine(self) -> Engine:
        """The engine for tensor inputs now: ``self.engine``, or, with bn_stats='running' and a BatchNorm
        in evaluation mode, a generic-path engine (the fused path runs batch statistics only)."""
        names = self._eval_batchnorms()
        if not names:
            return self.engine
        eng = self.__dict__.get("_bn_eval_engine")
        if eng is None:
            b = self.engine.batched.batching
            eng = Engine(self.model, self.layout, self.inner_lr, self.engine.kernel_backend,
                         b if b in ("vmap", "loop") else "loop")
            eng.store_budget = self.engine.store_budget
            eng.batched = TaskBatchedModel(self.model, self.layout, b)
            eng.batched.bn_keep_eval = True
            eng.fused = None
            self.__dict__["_bn_eval_engine"] = eng
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        eng.fallback_reason = (f"BatchNorm in eval mode with bn_stats='running' ({', '.join(names[:3])}{more}) "
                               "normalizes with running statistics; the fused path runs per-task batch statistics only")
        return eng

    def _check_reference_eval(self, where: str) -> None:
        names = self._eval_batchnorms()
        if self.backend == "reference" and names:
            raise ValueError(
                f"{where}: backend='reference' runs per-task batch statistics only (its oracle), but "
                f"{', '.join(names)} is in evaluation mode with bn_stats='running' (running statistics); use "
                "backend='engine', or put the BatchNorm modules in training mode")

    @contextlib.contextmanager
    def _bn_updates(self, engine: Optional[Engine] = None):
        """bn_stats='running': a :class:`bn_running.Recorder` for the BatchNorm modules in training mode
        (None when there is none, or for bn_stats='batch'), applied when the outermost such context ends
        without an error; a nested context (``adapt`` and ``predict`` inside ``evaluate``) records into
        the outer one's, so the per-task order covers both. ``engine`` (default :meth:`_engine`) runs
        the statistics passes (its fused path when it has one)."""
        outer = self._bn_recorder
        if outer is not None:
            yield outer
            return
        rec = None
        if self.bn_stats == "running":
            bn_running.check_running(self.model)
            bns = bn_running.updating_batchnorms(self.model)
            if bns:
                engine = engine if engine is not None else self._engine()
                rec = bn_running.Recorder(engine.batched, bns, engine)
        self._bn_recorder = rec
        try:
            yield rec
        finally:
            self._bn_recorder = None
        if rec is not None:
            rec.apply()

    # -- checks --------------------------------------------------------------------------------
    def _check_model(self, where: str) -> None:
        """The model's parameters are those the learner was built with (``fastmaml/param_record.py``).

        Refused (ValueError naming the parameter): a parameter replaced (its module swapped for
        another), added, removed or reshaped, and a change of ``requires_grad`` that changes which
        parameters the inner loop adapts (an adapted one frozen, or a frozen one made trainable that
        a learner built now would adapt): the flat layout, the per-layer inner rates, the compiled
        kernels and the optimizer all refer to the parameters of the construction. Followed: a
        ``requires_grad`` change of a parameter the inner loop does not adapt (BatchNorm's affine
        ones by default, ANIL's body): from this call on it gets a meta-gradient (or none, and no
        ``.grad``) exactly as in a learner built after the change. Cost: one pass over
        ``named_parameters()`` comparing identities, no tensor data read."""
        current = list(self.model.named_parameters())
        record = self._params_built
        if record.same_as(current):
            return
        change = record.structure_change(current)
        if change is not None:
            raise ValueError(
                f"{where}: the model changed after the learner was built: {change}. The learner's flat layout "
                "of adapted parameters, its inner learning rates and its optimizer hold the parameters it was "
                "built with; build a new learner (and optimizer) for the changed model")
        frozen, thawed = record.trainable_change(current)
        adapted = set(self.layout.names)
        bad = [f"model.{n} is adapted by the inner loop but was frozen (requires_grad=False) after the learner "
               "was built" for n in frozen if n in adapted]
        bad += [f"model.{n} was frozen when the learner was built and is trainable now (a learner built now "
                "would adapt it)" for n in thawed if n in self._adapt_candidates]
        if bad:
            raise ValueError(
                f"{where}: {'; '.join(bad)}. Which parameters the inner loop adapts is fixed when the learner "
                "is built (their flat layout and inner learning rates): set requires_grad back, or build a new "
                "learner (and optimizer) after freezing")
        self._trainable_changed()
        self._params_built = ParamRecord(self.model)

    def _trainable_changed(self) -> None:
        """``requires_grad`` of a parameter that is not adapted changed: forget what depends on it (the
        fused program's set of trainable parameters, recorded CUDA graphs, probed chunk sizes)."""
        for eng in (self.engine, self.__dict__.get("_bn_eval_engine"), self.__dict__.get("_general")):
            if eng is not None and eng.fused is not None:
                eng.fused.forget_trainable()
        self._graphs.clear()
        self._graphed = None
        self._auto_chunk.clear()

    def _weights(self, steps: int) -> Sequence[float]:
        if self.multi_step_weights is None:
            return [0.0] * (steps - 1) + [1.0]
        if steps != len(self.multi_step_weights):
            raise ValueError(
                f"steps={steps} differs from the {len(self.multi_step_weights)} multi_step_weights"
            )
        return self.multi_step_weights

    def _steps(self, steps: Optional[int], least: int = 1) -> int:
        steps = self.inner_steps if steps is None else steps
        if not _is_int(steps) or steps < least:
            raise ValueError(f"steps must be an int >= {least}, got {steps!r} ({type(steps).__name__})")
        steps = int(steps)
        self.inner_lr.check_steps(steps)
        return steps

    def _reference_param(self) -> Tensor:
        return next(p for n, p in self.model.named_parameters() if n == self.layout.names[0])

    def _check_deterministic(self, where: str) -> None:
        """Refuse modules that draw random numbers in training mode (Dropout and the like)."""
        for name, m in self.model.named_modules():
            if not m.training:
                continue
            random = (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or isinstance(m, nn.RReLU)
            if random:
                what = f"model.{name}" if name else "model"
                extra = f", p={m.p}" if isinstance(m, nn.modules.dropout._DropoutNd) else ""
                raise ValueError(
                    f"{where}: {what} ({type(m).__name__}{extra}) is in training mode and draws random numbers; "
                    "the inner steps and the meta-gradient's reverse pass would use different random masks, "
                    f"so the meta-gradient would be wrong. Put it in evaluation mode ({what}.eval() or "
                    "learner.eval(); " + ("BatchNorm then uses its running statistics"
                                          if self.bn_stats == "running" else "BatchNorm keeps using batch statistics")
                    + ") or remove it")

    @staticmethod
    def _check_finite_input(name: str, x: Tensor) -> None:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = bad.nonzero()[0]
            t, n = int(idx[0]), int(idx[1])
            raise ValueError(f"{name} holds a non-finite value ({x[tuple(idx)].item()}) in task {t}, example {n}")

    def _check_x(self, name: str, x: Tensor, ref: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {ref.device}")
        if x.dim() < 2:
            raise ValueError(f"{name} must be task-batched [T, N, ...], got shape {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of the model's dtype {ref.dtype}, got {x.dtype}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {ref.dtype}")

    def _check_inputs(self, pairs: Sequence[Tuple[str, Tensor, str, Tensor]],
                      loss_fn: Optional[LossFn] = None) -> None:
        ref = self._reference_param()
        T = None
        for xname, x, yname, y in pairs:
            self._check_x(xname, x, ref)
            if not isinstance(y, Tensor):
                raise TypeError(f"{yname} must be a Tensor, got {type(y).__name__}")
            if y.device != ref.device:
                raise ValueError(f"{yname} is on {y.device} but the model is on {ref.device}")
            if y.dim() < 2:
                raise ValueError(f"{yname} must be task-batched [T, N, ...], got shape {_shape(y)}")
            if T is None:
                T = x.shape[0]
            for name, t in ((xname, x), (yname, y)):
                if t.shape[0] != T:
                    raise ValueError(f"{name} has {t.shape[0]} tasks (shape {_shape(t)}) but {pairs[0][0]} has {T}")
            if x.shape[1] == 0:
                raise ValueError(f"{xname} is empty: every task needs at least one example, got shape {_shape(x)}")
            if y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"{yname} must have one target per example of {xname}: shape [{T}, {x.shape[1]}, ...], "
                    f"got {_shape(y)}"
                )
            if y.is_floating_point():
                if y.dtype != ref.dtype:
                    raise TypeError(f"{yname} has dtype {y.dtype} but the model's parameters are {ref.dtype}")
            elif y.dtype != torch.int64:
                raise TypeError(f"{yname} must hold int64 class labels or float targets, got {y.dtype}")
        if T == 0:
            raise ValueError("the task batch is empty (T = 0)")
        x0name, x0 = pairs[0][0], pairs[0][1]
        for xname, x, _, _ in pairs[1:]:
            if x.shape[2:] != x0.shape[2:]:
                raise ValueError(
                    f"{xname} has examples of shape {_shape(x[0, 0])} but {x0name}'s are {_shape(x0[0, 0])}: "
                    "the model sees the query examples in the support examples' shape")
        for xname, x, _, _ in pairs:
            self._check_finite_input(xname, x)
        out_shape = self._output_shape(x0)
        out = out_shape[-1] if out_shape else 1
        for xname, x, yname, y in pairs:
            pred = f"[{T}, {x.shape[1]}" + "".join(f", {s}" for s in out_shape) + "]"
            if is_classification(y):
                if loss_fn is None and y.dim() != 2:
                    raise ValueError(
                        f"{yname}: int64 class labels must have shape [T, N] = [{T}, {x.shape[1]}] (one label per "
                        f"example; the predictions are {pred}), got {_shape(y)}")
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= out:
                    raise ValueError(f"{yname} holds labels in [{lo}, {hi}] but the model outputs {out} classes")
            elif tuple(y.shape[2:]) != tuple(out_shape):
                raise ValueError(
                    f"{yname} holds float targets of shape {_shape(y)} but the model's predictions are {pred}: "
                    f"regression targets must have the prediction's shape {pred} (they would be broadcast); "
                    f"for classification give int64 labels of shape [{T}, {x.shape[1]}]")

    def _output_shape(self, x: Tensor) -> Tuple[int, ...]:
        """The model's output shape per example for inputs shaped like x[0]; a probe forward on one task."""
        key = tuple(x.shape[2:])
        if key not in self._out_features:
            try:
                keep_eval = self.bn_stats == "running"  # BatchNorm in eval mode: running statistics
                with torch.no_grad(), batch_statistics(self.model, keep_eval), inner_step(0):  # step: per-step BatchNorm
                    out = self.model(x[0])
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"the model rejected inputs of shape {_shape(x[0])} (one task of {_shape(x)}): {e}") from e
            self._out_features[key] = tuple(out.shape[1:])
        return self._out_features[key]

    def _check_meta_gradient(self, grads: Dict[str, Tensor], lr_grad: Optional[Tensor]) -> None:
        items = list(grads.items()) + ([("inner_lr.lr", lr_grad)] if lr_grad is not None else [])
        for name, g in items:
            if not bool(torch.isfinite(g).all()):
                n_bad = int((~torch.isfinite(g)).sum())
                raise FloatingPointError(
                    f"non-finite meta-gradient: {n_bad} of the {g.numel()} elements of the gradient of {name} are "
                    "NaN or Inf although the losses are finite (an inner_lr or inputs too large?); "
                    "the model's parameters and .grad are unchanged")

    @staticmethod
    def _check_finite(support_losses: Tensor, query_losses: Tensor, weights: Sequence[float]) -> None:
        K = support_losses.shape[0]
        bad = ~torch.isfinite(support_losses)
        if bool(bad.any()):
            k, t = (int(i) for i in bad.nonzero()[0])
            raise FloatingPointError(
                f"non-finite support (inner) loss {support_losses[k, t].item()} at inner step {k} of task {t}; "
                "the model's parameters and .grad are unchanged"
            )
        rows = [k for k in range(1, K + 1) if k == K or weights[k - 1] != 0.0]
        bad = ~torch.isfinite(query_losses[rows])
        if bool(bad.any()):
            i, t = (int(j) for j in bad.nonzero()[0])
            raise FloatingPointError(
                f"non-finite query loss {query_losses[rows[i], t].item()} after inner step {rows[i]} of task {t}; "
                "the model's parameters and .grad are unchanged"
            )

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
        self._check_model("meta_step")
        steps = self._steps(steps)
        weights = self._weights(steps)
        self._check_deterministic("meta_step")
        self._check_reference_eval("meta_step")
        loss_fn = resolve_loss(loss_fn, support_y)
        self._check_inputs((("support_x", support_x, "support_y", support_y), ("query_x", query_x, "query_y", query_y)),
                           loss_fn)
        T = support_x.shape[0]
        c = self._chunk_size(support_x, support_y, query_x, query_y, steps, weights, loss_fn)
        bounds = [(i, min(i + c, T)) for i in range(0, T, c)]
        # bn_stats="running": the BatchNorm statistics of each chunk's forwards, applied once all checks passed
        with self._bn_updates() as rec:
            results = [self._meta_gradient(support_x[a:b], support_y[a:b], query_x[a:b], query_y[a:b], steps, weights,
                                           loss_fn, len(bounds) > 1 and T % c != 0,
                                           None if rec is None else rec.observer(support_x[a:b], query_x[a:b], steps,
                                                                                 weights, a))
                       for a, b in bounds]
            r = results[0] if len(results) == 1 else _combine(results, [(b - a) / T for a, b in bounds])
            self._check_finite(r.support_losses, r.query_losses_all, weights)
            if self.backend == "reference":
                grads = r.param_grads
            else:
                grads = dict(self.layout.views(r.theta_grad))
                grads.update(r.shared_grads)
            lr_grad = r.lr_grad
            self._check_meta_gradient(grads, lr_grad)
        for name, p in self.model.named_parameters():
            if name in grads:
                _accumulate(p, grads[name])
        if lr_grad is not None:
            _accumulate(self.inner_lr.lr, lr_grad)
        return MetaStepOutput(r.objective, r.query_losses, r.query_accuracy)

    def _meta_gradient(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int, weights: Sequence[float],
                       loss_fn: Optional[LossFn], two_graphs: bool = False, observe=None):
        """One backend call on a batch (or chunk) of tasks: an EngineResult, or the reference's result.
        ``observe(k, theta_k)``: sees the inner loop's iterates (bn_stats='running')."""
        if self.backend == "reference":
            r = reference.meta_gradient(self.model, self.inner_lr, self.layout, sx, sy, qx, qy, steps,
                                        self.first_order, weights, loss_fn)
            if observe is not None:  # the oracle keeps no iterates: the per-task inner loop again
                self._reference_adapt(sx, sy, steps, loss_fn, observe)
            return r
        if self.cuda_graph:
            return self._replay(sx, sy, qx, qy, steps, weights, loss_fn, 2 if two_graphs else 1)
        return self._engine().meta_gradient(sx, sy, qx, qy, steps, self.first_order, weights, loss_fn, self.memory,
                                            observe)

    def _chunk_size(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int, weights: Sequence[float],
                    loss_fn: Optional[LossFn]) -> int:
        T = sx.shape[0]
        if self.task_chunk is None:
            return T
        if self.task_chunk != "auto":
            return min(self.task_chunk, T)
        key = (tuple(sx.shape[1:]), tuple(sy.shape[1:]), tuple(qx.shape[1:]), tuple(qy.shape[1:]), sx.dtype,
               sy.dtype, str(sx.device), steps, tuple(weights), self.first_order, self.memory, loss_fn)
        if key not in self._auto_chunk:
            self._auto_chunk[key] = probe_chunk(self, sx, sy, qx, qy, steps, weights, loss_fn, self.memory_budget)
        return min(self._auto_chunk[key], T)

    def _replay(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int,
                weights: Sequence[float], loss_fn: Optional[LossFn], keep: int = 1) -> EngineResult:
        """The engine's meta-gradient through the recorded CUDA graph (recorded first if needed);
        returns copies, since the graph's outputs are overwritten by its next replay."""
        if sx.device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs the model and the inputs on a CUDA device, they are on {sx.device}")
        inputs = (sx, sy, qx, qy)
        key = graph_key(self.engine, inputs, steps, self.first_order, weights, loss_fn, self.memory)
        graphed = self._graphs.get(key)
        if graphed is None:
            # release the other graphs' memory pools before recording a new one (task chunks keep two:
            # the full chunks' shape and the remainder's)
            while len(self._graphs) >= keep:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphed = None
            graphed = GraphedMetaGradient(key, self.engine, inputs, steps, self.first_order, weights,
                                          loss_fn, self.memory)
            self._graphs[key] = graphed
        self._graphed = graphed
        r = graphed(*inputs)
        return EngineResult(**{f.name: _clone(getattr(r, f.name)) for f in fields(EngineResult)})

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
                engine = self._engine() if loss_fn is None else self._general_engine()
                flat, losses = adapt_with_graph(self, engine, support_x, support_y, steps, loss_fn, self.memory,
                                                observe)
            elif self.backend == "reference":
                flat, losses = self._reference_adapt(support_x, support_y, steps, loss_fn, observe)
            else:
                flat, losses = self._engine().adapt(support_x, support_y, steps, loss_fn, observe)
            if not bool(torch.isfinite(losses).all()):
                k, t = (int(i) for i in (~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"non-finite support loss at inner step {k} of task {t}")
            if not bool(torch.isfinite(flat).all()):
                raise FloatingPointError("non-finite fast weights after the inner steps although the support losses "
                                         "are finite (an inner_lr or inputs too large?)")
        return FastWeights(flat, losses, self._identity, self.layout, tuple(support_x.shape[2:]))

    def _general_engine(self):
        """The engine for several inputs, pytree targets and custom losses (made on first use)."""
        eng = self.__dict__.get("_general")
        if eng is None:
            eng = GeneralEngine(self.model, self.layout, self.inner_lr, self.engine.kernel_backend,
                                self.engine.batched.batching)
            eng.batched.bn_keep_eval = self.bn_stats == "running"
            self.__dict__["_general"] = eng
        return eng

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
        eng = self._general_engine()
        with self._bn_updates(eng) as rec:
            observe = None if rec is None else rec.observer(sx, None, steps)
            if create_graph:
                flat, losses = adapt_with_graph(self, eng, sx, sy, steps, loss_fn, self.memory, observe)
            else:
                flat, losses = eng.adapt(sx, sy, steps, loss_fn, observe)
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
                raise ValueError(f"x has examples of shape {_shape(x[0, 0])} but the support set's are {want}")
            engine = self._engine()
        else:
            engine = self._general_engine()
        batched = engine.batched
        step = query_step(fast.support_losses.shape[0])  # after K updates: step K - 1
        with self._bn_updates(engine) as rec:
            with inner_step(step):
                out = batched.forward(fast.flat, x)
            if rec is not None:
                rec.record(fast.flat, x, step)
        return out

    def _reference_adapt(self, sx, sy, steps, loss_fn, observe=None):
        """The oracle's per-task inner loop: (theta_K [T, P], support losses [K, T]);
        ``observe(k, theta_k [T, P])`` for k = 0..K afterwards, as the engine's."""
        loss_fn = loss_fn or (torch.nn.functional.cross_entropy if is_classification(sy) else torch.nn.functional.mse_loss)
        lr = self.inner_lr.lr.detach()
        iterates: List[List[Tensor]] = [[] for _ in range(steps + 1)]  # [k][t]
        losses = torch.empty(steps, sx.shape[0], dtype=lr.dtype, device=lr.device)
        with torch.enable_grad(), batch_statistics(self.model):
            for t in range(sx.shape[0]):
                fast = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
                iterates[0].append(self.layout.flatten(fast[n].detach() for n in self.layout.names))
                for k in range(steps):
                    fast, loss = reference.sgd_step(self.model, self.inner_lr, self.layout, fast, k,
                                                    sx[t], sy[t], False, loss_fn, lr.to(sx.dtype))
                    losses[k, t] = loss.detach()
                    iterates[k + 1].append(self.layout.flatten(fast[n].detach() for n in self.layout.names))
        if observe is not None:
            for k, its in enumerate(iterates):
                observe(k, torch.stack(its))
        return torch.stack(iterates[steps]), losses

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
            raise ValueError(f"x has {x.shape[0]} tasks (shape {_shape(x)}) but fast holds {T} tasks' weights")
        if x.shape[1] == 0:
            raise ValueError(f"x is empty: every task needs at least one example, got shape {_shape(x)}")
        if fast.example_shape is not None and tuple(x.shape[2:]) != tuple(fast.example_shape):
            want = "[" + ", ".join(str(s) for s in fast.example_shape) + "]"
            raise ValueError(f"x has examples of shape {_shape(x[0, 0])} but the support set's are {want}")
        self._check_finite_input("x", x)
        # the query pass after K updates runs at inner step K - 1 (per-step BatchNorm weights)
        step = query_step(fast.support_losses.shape[0])
        engine = self._engine()
        with self._bn_updates(engine) as rec:
            out = engine.forward(fast.flat, x, step=step)
            if rec is not None:
                rec.record(fast.flat, x, step)
        return out

    def _check_fast(self, fast: FastWeights) -> None:
        if not isinstance(fast, FastWeights):
            hint = " (pass the FastWeights itself, not fast.flat)" if isinstance(fast, Tensor) else ""
            article = "a Tensor" if isinstance(fast, Tensor) else type(fast).__name__
            raise TypeError(f"fast must be the FastWeights that this learner's adapt() returned, got {article}{hint}")
        if fast.layout is not None and fast.layout != self.layout:
            raise ValueError(
                f"fast holds weights of another learner: a layout of {fast.layout.numel} adapted numbers in "
                f"{fast.layout.num_segments} tensors, this learner adapts {self.layout.numel} in "
                f"{self.layout.num_segments}; use the learner whose adapt() made them")
        if fast.learner is not None and fast.learner is not self._identity:
            raise ValueError("fast holds weights made by another learner (same layout, but its other parameters "
                             "may differ); use the learner whose adapt() made them")
        ref = self._reference_param()
        flat = fast.flat
        if not isinstance(flat, Tensor) or flat.dim() != 2 or flat.shape[1] != self.layout.numel:
            got = _shape(flat) if isinstance(flat, Tensor) else type(flat).__name__
            raise ValueError(f"fast.flat must be [T, P={self.layout.numel}], got {got}")
        if flat.device != ref.device or flat.dtype != ref.dtype:
            raise ValueError(f"fast.flat is {flat.dtype} on {flat.device} but the model is {ref.dtype} on {ref.device}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("fast.flat holds non-finite values")

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


# -- task chunks -----------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value, name: str = "memory_budget", least: int = 1) -> int:
    """Bytes from an int or a string like ``"8GiB"``, ``"512 MB"``, ``"1.5e9"``; >= ``least``."""
    if _is_int(value):
        n = int(value)
    elif isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size such as '8GiB', '512MB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"{name} must be an int (bytes) or a string such as '8GiB', got {type(value).__name__}")
    if n < least:
        raise ValueError(f"{name} must be {'positive' if least == 1 else f'>= {least}'}, got {value!r}")
    return n


def _check_task_chunk(value):
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"task_chunk must be None, an int >= 1 or 'auto', got {value!r}")
    if not _is_int(value):
        raise TypeError(f"task_chunk must be None, an int >= 1 or 'auto', got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"task_chunk must be >= 1, got {value}")
    return int(value)


def _combine(results: List, weights: List[float]):
    """One result from the results of task chunks: gradients and the objective are each chunk's
    (a mean over its own tasks) weighted by its share of the tasks; per-task values concatenated."""
    first = results[0]
    out = {}
    for f in fields(first):
        vals = [getattr(r, f.name) for r in results]
        if f.name in ("query_losses", "query_accuracy"):
            out[f.name] = None if vals[0] is None else torch.cat(vals, 0)
        elif f.name in ("support_losses", "query_losses_all"):
            out[f.name] = torch.cat(vals, 1)
        elif isinstance(vals[0], dict):
            out[f.name] = {k: sum(w * v[k] for w, v in zip(weights, vals)) for k in vals[0]}
        elif vals[0] is None:
            out[f.name] = None
        else:
            acc = vals[0] * weights[0]
            for w, v in zip(weights[1:], vals[1:]):
                acc = acc + w * v
            out[f.name] = acc
    return type(first)(**out)


def _rss_peak_reset() -> Optional[int]:
    """Linux: return unused heap to the system, reset the peak resident set (``VmHWM``) to the
    current one, and return it; None where that is not possible."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except (OSError, AttributeError, ValueError):
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(key)


def measure_peak(fn, device: torch.device) -> Tuple[int, str]:
    """Run ``fn()`` and return (the peak bytes it added on top of what was held before, the method).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics. CPU (Linux): the
    process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after
    ``malloc_trim``) over its resident set before; elsewhere the allocation events of
    ``torch.profiler`` (torch's own allocations only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - base, 0), "torch.cuda.max_memory_allocated"
    base = _rss_peak_reset()
    if base is not None:
        fn()
        return max(_proc_status("VmHWM") - base, 0), "peak resident set (VmHWM after clear_refs)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak, "torch.profiler allocation events"


def probe_chunk(learner: "MAML", sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int,
                weights: Sequence[float], loss_fn: Optional[LossFn], budget: Optional[int]) -> int:
    """``task_chunk="auto"``: the largest chunk whose meta-step fits ``budget`` bytes.

    Measures (:func:`measure_peak`) the eager meta-step of 1 task and of min(T, 4) tasks of this
    batch, after one unmeasured warm-up: peak(c) ~ fixed + c * per_task, so
    c = (0.9 * budget - fixed) // per_task, clipped to [1, T]. On the CPU the resident-set measure
    can miss memory that the allocator reuses from earlier steps: the budget is a target, not a
    hard limit (measured: a 200 MiB budget on the standard workload gave c = 3 and a 245 MiB peak
    in a fresh process, whose first step also pays one-time costs). The probe's gradients are
    discarded (the
    model and ``.grad`` are untouched). The choice is in ``learner.chunk_info``."""
    T = sx.shape[0]
    device = sx.device
    budget = default_memory_budget(device) if budget is None else budget

    def run(c: int):
        def fn():
            if learner.backend == "reference":
                reference.meta_gradient(learner.model, learner.inner_lr, learner.layout, sx[:c], sy[:c], qx[:c],
                                        qy[:c], steps, learner.first_order, weights, loss_fn)
            else:
                learner._engine().meta_gradient(sx[:c], sy[:c], qx[:c], qy[:c], steps, learner.first_order, weights,
                                             loss_fn, learner.memory)
        return fn

    run(1)()  # warm-up: lazy initialization is not a per-task cost
    m1, method = measure_peak(run(1), device)
    c2 = min(T, 4)
    if c2 > 1:
        m2, _ = measure_peak(run(c2), device)
        per_task = max((m2 - m1) / (c2 - 1), m2 / (2 * c2), 1.0)
        fixed = max(m2 - c2 * per_task, 0.0)
    else:
        per_task, fixed = max(float(m1), 1.0), 0.0
    c = max(1, int((0.9 * budget - fixed) // per_task))  # 10% margin; not clipped to T (cached)
    learner.chunk_info = {"task_chunk": min(c, T), "budget": budget, "per_task_bytes": int(per_task),
                          "fixed_bytes": int(fixed), "method": method, "tasks": T}
    return c


class _LearnerIdentity:
    """A token that tells this learner's FastWeights from another's (a copy of a learner gets its own)."""

    __slots__ = ()


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_number(name: str, value, low: float = 0.0, low_open: bool = False, high: Optional[float] = None) -> float:
    """``value`` as a float: a real number (Python, numpy, or a 0-d tensor; not a bool or a string),
    finite, >= ``low`` (> with ``low_open``) and <= ``high``; else an error naming ``name``."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < low or (low_open and v == low) or (high is not None and v > high):
        lo = f"({low:g}" if low_open else f"[{low:g}"
        hi = f"{high:g}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return v


def _check_weights(weights) -> List[float]:
    """multi_step_weights as floats: each a finite number >= 0 (w_k weighs the query loss after step k)."""
    items = None
    if not isinstance(weights, (str, bytes)):
        try:
            items = list(weights)
        except TypeError:
            pass
    if items is None:
        raise TypeError(f"multi_step_weights must be a sequence of numbers (w_1..w_K), got {weights!r} "
                        f"({type(weights).__name__})")
    return [check_number(f"multi_step_weights[{i}]", w) for i, w in enumerate(items)]


def _adapt_candidates(model: nn.Module, adapt: AdaptSpec, adapt_bn: bool) -> frozenset:
    """Names of the parameters that the selection ``adapt`` / ``adapt_bn`` takes when trainable (frozen
    ones included): what a learner built after a parameter is unfrozen would adapt."""
    return frozenset(matching_adapt(model, adapt, adapt_bn, list(model.named_parameters())))


def _clone(x):
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: v.clone() for k, v in x.items()}
    return x


def _accumulate(p: Tensor, g: Tensor) -> None:
    g = g.detach().to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)
