"""Which models the fused path runs: a model compiled into a straight list of layer nodes.

The node classes live with their layer families (:mod:`.conv`, :mod:`.batchnorm`, ...), each
owning its four passes; this module only maps modules to nodes. A model is supported when it is an ``nn.Sequential`` (nested ones too) of the layers below, or the
project's :class:`fastmaml.models.Conv4`:

===========================  ==================================================================
module                       node
===========================  ==================================================================
Conv2d                       ``Conv``: square kernel, equal stride and padding, zero padding,
                             dilation 1, groups 1, with or without bias
ZeroPad2d, then Conv2d       ``Conv`` with ``pre_pad``: any zero padding (e.g. TensorFlow's
                             asymmetric SAME, ``conv4(padding="tf")``); a ZeroPad2d before
                             anything else is not supported
BatchNorm2d / BatchNorm1d    ``BatchNormBlock``, fused with a following ReLU/LeakyReLU and a
                             following MaxPool2d(2); per-task batch statistics, affine or not
PerStepBatchNorm             ``BatchNormBlock`` with ``steps = S``: weight/bias [S, C], the runner
                             uses row min(step, S - 1) (MAML++'s per-step weights); dims=2 fuses
                             a MaxPool2d(2) like BatchNorm2d, dims=1 like BatchNorm1d
ReLU, LeakyReLU              ``Act`` (when not after a BatchNorm)
MaxPool2d(2)                 ``MaxPool`` (when not in a BatchNorm block): kernel 2, stride 2, no
                             padding, floor mode
AdaptiveAvgPool2d(1)         ``GlobalMean`` (keepdim); Conv4's mean over space likewise
Flatten                      ``Flatten`` (start_dim 1, end_dim -1)
Linear                       ``Linear``
Identity                     (dropped)
===========================  ==================================================================

Anything else (another module, a model with its own ``forward``) is not supported: ``compile``
then says which module made the model fall back to the generic path (vmap or a loop over
autograd), in one line.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from torch import nn

from ..models import Conv4, PerStepBatchNorm
from .activation import Act
from .batchnorm import BatchNormBlock
from .conv import Conv
from .linear import Linear
from .node import param_names
from .pooling import Flatten, GlobalMean, MaxPool


Node = Union[Conv, BatchNormBlock, Act, MaxPool, GlobalMean, Flatten, Linear]


class Unsupported(Exception):
    """Raised while compiling: the message names the module that the fused path cannot run."""


def _leaves(model: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out: List[Tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            out += _leaves(child, f"{prefix}{name}.")
        return out
    if isinstance(model, Conv4):
        tail = nn.Flatten() if model.max_pool else _SpatialMean()
        return (_leaves(model.features, f"{prefix}features.") + [(f"{prefix}<mean>", tail)]
                + [(f"{prefix}classifier", model.classifier)])
    return [(prefix.rstrip("."), model)]


class _SpatialMean(nn.Module):
    """Conv4's ``h.mean(dim=(2, 3))`` (no module of its own)."""


def _pair_is(value, want: int) -> bool:
    return all(v == want for v in (value if isinstance(value, tuple) else (value, value)))


def _square(value) -> int:
    vals = value if isinstance(value, tuple) else (value, value)
    if len(set(vals)) != 1:
        raise Unsupported(f"non-square {vals}")
    return int(vals[0])


def _is_pool2(m: nn.Module) -> bool:
    return (isinstance(m, nn.MaxPool2d) and _pair_is(m.kernel_size, 2) and _pair_is(m.stride, 2)
            and _pair_is(m.padding, 0) and _pair_is(m.dilation, 1) and not m.ceil_mode and not m.return_indices)


def _slope(m: nn.Module) -> Optional[float]:
    if isinstance(m, nn.ReLU):
        return 0.0
    if isinstance(m, nn.LeakyReLU):
        return float(m.negative_slope)
    return None


def _pname(prefix: str, module: nn.Module, attr: str) -> Optional[str]:
    return f"{prefix}.{attr}" if prefix and getattr(module, attr, None) is not None else (
        attr if getattr(module, attr, None) is not None else None)


def compile_model(model: nn.Module) -> List[Node]:
    """The model as a list of nodes; raises ``Unsupported`` naming the first module it cannot run."""
    if not isinstance(model, (nn.Sequential, Conv4)):
        raise Unsupported(f"the model ({type(model).__name__}) has its own forward; the fused path runs "
                          "nn.Sequential models of supported layers and fastmaml.models.Conv4")
    leaves = [(n, m) for n, m in _leaves(model, "") if not isinstance(m, nn.Identity)]
    nodes: List[Node] = []
    i = 0
    while i < len(leaves):
        name, m = leaves[i]
        where = f"{name} ({type(m).__name__})"
        pre_pad = None
        if isinstance(m, nn.ZeroPad2d):
            if i + 1 >= len(leaves) or not isinstance(leaves[i + 1][1], nn.Conv2d):
                raise Unsupported(f"{where}: a ZeroPad2d runs fused only right before a Conv2d")
            pre_pad = tuple(int(v) for v in m.padding)  # (left, right, top, bottom)
            if min(pre_pad) < 0:
                raise Unsupported(f"{where}: negative padding (cropping) {pre_pad}")
            i += 1
            name, m = leaves[i]
            where = f"{name} ({type(m).__name__})"
        if isinstance(m, nn.Conv2d):
            try:
                k = _square(m.kernel_size)
                stride, padding = _square(m.stride), _square(m.padding) if not isinstance(m.padding, str) else None
            except Unsupported as e:
                raise Unsupported(f"{where}: {e} kernel, stride or padding") from None
            if padding is None or m.groups != 1 or not _pair_is(m.dilation, 1) or m.padding_mode != "zeros" or k < 1:
                raise Unsupported(f"{where}: only groups=1, dilation=1, zero padding given as a number")
            nodes.append(Conv(_pname(name, m, "weight"), _pname(name, m, "bias"), stride, padding,
                              pre_pad if pre_pad and any(pre_pad) else None))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, PerStepBatchNorm)):
            per_step = isinstance(m, PerStepBatchNorm)
            two_d = m.dims == 2 if per_step else isinstance(m, nn.BatchNorm2d)
            slope, pool = 1.0, 0
            if i + 1 < len(leaves) and _slope(leaves[i + 1][1]) is not None:
                i += 1
                slope = _slope(leaves[i][1])
            if two_d and i + 1 < len(leaves) and _is_pool2(leaves[i + 1][1]):
                i += 1
                pool = 2
            w = _pname(name, m, "weight") if m.affine else None
            b = _pname(name, m, "bias") if m.affine else None
            nodes.append(BatchNormBlock(w, b, float(m.eps), slope, pool, m.steps if per_step else 0))
        elif _slope(m) is not None:
            nodes.append(Act(_slope(m)))
        elif _is_pool2(m):
            nodes.append(MaxPool())
        elif isinstance(m, nn.AdaptiveAvgPool2d) and _pair_is(m.output_size, 1):
            nodes.append(GlobalMean(keepdim=True))
        elif isinstance(m, _SpatialMean):
            nodes.append(GlobalMean(keepdim=False))
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            nodes.append(Flatten())
        elif isinstance(m, nn.Linear):
            nodes.append(Linear(_pname(name, m, "weight"), _pname(name, m, "bias")))
        else:
            raise Unsupported(f"{where} is not a layer the fused path runs")
        i += 1
    if not nodes:
        raise Unsupported("the model has no layers")
    return nodes


def params_of(node: Node) -> Tuple[str, ...]:
    return param_names(node)
