"""The learner's checks of its arguments and inputs (``fastmaml.MAML`` and the algorithms built on it).

Free functions check constructor arguments (numbers, byte sizes, ``task_chunk``, multi-step weights);
:class:`LearnerChecks`, a mixin of :class:`fastmaml.MAML`, checks every call: the model still has the
parameters the learner was built with, the inputs are task-batched [T, N, ...] tensors of the model's
device and dtype with finite values and targets that fit the predictions, no module draws random
numbers, and the meta-gradient is finite. A refused call raises an error naming the argument or the
module and changes no parameter or ``.grad``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..functional import LossFn, batch_statistics, is_classification
from ..param_record import ParamRecord
from ..step_context import inner_step
from .outputs import FastWeights


def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def is_int(v) -> bool:
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


def check_weights(weights) -> List[float]:
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


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value, name: str = "memory_budget", least: int = 1) -> int:
    """Bytes from an int or a string like ``"8GiB"``, ``"512 MB"``, ``"1.5e9"``; >= ``least``."""
    if is_int(value):
        n = int(value)
    elif isinstance(value, str):
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


def check_task_chunk(value):
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"task_chunk must be None, an int >= 1 or 'auto', got {value!r}")
    if not is_int(value):
        raise TypeError(f"task_chunk must be None, an int >= 1 or 'auto', got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"task_chunk must be >= 1, got {value}")
    return int(value)


class LearnerChecks:
    """The checks of :class:`fastmaml.MAML`'s calls (module docstring). Reads the learner's ``model``,
    ``layout``, ``inner_lr``, ``inner_steps``, ``multi_step_weights``, ``bn_stats`` and the records
    made at construction (``_params_built``, ``_adapt_candidates``, ``_identity``, ``_out_features``)."""

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
        if not is_int(steps) or steps < least:
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
            raise ValueError(f"{name} must be task-batched [T, N, ...], got shape {shape_str(x)}")
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
                raise ValueError(f"{yname} must be task-batched [T, N, ...], got shape {shape_str(y)}")
            if T is None:
                T = x.shape[0]
            for name, t in ((xname, x), (yname, y)):
                if t.shape[0] != T:
                    raise ValueError(f"{name} has {t.shape[0]} tasks (shape {shape_str(t)}) but {pairs[0][0]} has {T}")
            if x.shape[1] == 0:
                raise ValueError(f"{xname} is empty: every task needs at least one example, got shape {shape_str(x)}")
            if y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"{yname} must have one target per example of {xname}: shape [{T}, {x.shape[1]}, ...], "
                    f"got {shape_str(y)}"
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
                    f"{xname} has examples of shape {shape_str(x[0, 0])} but {x0name}'s are {shape_str(x0[0, 0])}: "
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
                        f"example; the predictions are {pred}), got {shape_str(y)}")
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= out:
                    raise ValueError(f"{yname} holds labels in [{lo}, {hi}] but the model outputs {out} classes")
            elif tuple(y.shape[2:]) != tuple(out_shape):
                raise ValueError(
                    f"{yname} holds float targets of shape {shape_str(y)} but the model's predictions are {pred}: "
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
                raise ValueError(f"the model rejected inputs of shape {shape_str(x[0])} (one task of {shape_str(x)}): {e}") from e
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
            got = shape_str(flat) if isinstance(flat, Tensor) else type(flat).__name__
            raise ValueError(f"fast.flat must be [T, P={self.layout.numel}], got {got}")
        if flat.device != ref.device or flat.dtype != ref.dtype:
            raise ValueError(f"fast.flat is {flat.dtype} on {flat.device} but the model is {ref.dtype} on {ref.device}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("fast.flat holds non-finite values")
