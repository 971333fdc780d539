"""2-D convolutions, task-batched: every task its own filters.

    y[t] = conv2d(x[t], w[t]) + b[t]     x [T, N, C, H, W], w [T, O, C, kh, kw], b [T, O], y [T, N, O, Ho, Wo]

(square kernel, equal stride and padding on both axes, zero padding, dilation 1, groups 1). A node
may also pad its input first, by any zero padding ``pre_pad = (left, right, top, bottom)`` (a
``nn.ZeroPad2d`` before the convolution: TensorFlow's asymmetric SAME): padding is linear, so every
pass pads what goes into the convolution (x, R{x}) and crops what comes out towards the input
(dL/dx, R{dL/dx}) to the unpadded positions.
conv is linear in x and in w, so with conv^T its transpose in x and wgrad(x, dy) its transpose in w:

* forward:    y = conv(x, w) + b
* backward:   dL/dx = conv^T(dy, w),  dL/dw = wgrad(x, dy),  dL/db = sum over (N, Ho, Wo) of dy
* R-forward:  R{y} = conv(R{x}, w) + conv(x, u_w) + u_b
              (the first two as ONE convolution of the input channels stacked: [R{x}, x] with [w, u_w])
* R-backward: R{dx} = conv^T(R{dy}, w) + conv^T(dy, u_w)   (one transposed convolution, output channels stacked)
              R{dw} = wgrad(x, R{dy}) + wgrad(R{x}, dy)    (one weight gradient, examples stacked)
              R{db} = sum R{dy}

Kernels (two swappable ones, ``conv2d_forward`` and ``conv2d_backward``; see
:func:`family_kernels`):

* torch: one grouped convolution over all tasks (groups = T: tasks never mix), ATen's
  convolution_backward for the backward;
* cpp: ``torch.ops.fastmaml.conv2d_tasks`` / ``conv2d_tasks_backward`` (csrc, tasks spread over
  cores); the backward picks per shape between the C++ kernel, one ATen call per task and the
  grouped call (:func:`cpu_conv_backward`);
* triton: a direct kernel for one-input-channel 3x3 convolutions (``fastmaml.triton.layers``),
  cuDNN's grouped convolution (the torch kernels) for every other shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import extension
from .node import PassContext, Saved
from .tensors import Opt

KERNELS = ("conv2d_forward", "conv2d_backward")


# -- torch implementation ----------------------------------------------------------------------

def _grouped(x: Tensor) -> Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W]"""
    T, N, C, H, W = x.shape
    return x.transpose(0, 1).reshape(N, T * C, H, W)


def _ungrouped(y: Tensor, T: int) -> Tensor:
    """[N, T*O, H, W] -> [T, N, O, H, W]"""
    N, TO, H, W = y.shape
    return y.view(N, T, TO // T, H, W).transpose(0, 1).contiguous()


def conv2d_forward(x: Tensor, w: Tensor, b: Opt, stride: int, padding: int) -> Tensor:
    """y [T, N, O, Ho, Wo] = conv2d(x[t], w[t], b[t]) for every task t."""
    T = x.shape[0]
    y = F.conv2d(_grouped(x), w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                 stride=stride, padding=padding, groups=T)
    return _ungrouped(y, T)


def conv2d_backward(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool, need_dw: bool,
                    need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    """(dx [T, N, C, H, W], dw [T, O, C, kh, kw], db [T, O]) of conv2d_forward, each only when asked
    (else None): dx = conv^T(dy, w), dw = wgrad(x, dy), db = sum dy over (N, Ho, Wo). ``x`` only
    gives the shape when dw is not asked for, ``w`` when dx is not."""
    T = x.shape[0]
    dx = dw = None
    if need_dx or need_dw:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            _grouped(dy), _grouped(x), w.reshape(-1, *w.shape[2:]), None, [stride, stride], [padding, padding],
            [1, 1], False, [0, 0], T, [need_dx, need_dw, False])
        dx = _ungrouped(dx, T) if need_dx else None
        dw = dw.view_as(w) if need_dw else None
    db = dy.sum(dim=(1, 3, 4)) if need_bias else None
    return dx, dw, db


def conv2d_backward_per_task(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool,
                             need_dw: bool, need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    """conv2d_backward as one ATen convolution backward per task (same results: each task is one
    group of the grouped convolution); on the CPU faster than the grouped call for large
    per-task batches (bench/bench_layers.py)."""
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    if need_dx or need_dw:
        for t in range(x.shape[0]):
            a, b, _ = torch.ops.aten.convolution_backward(
                dy[t], x[t], w[t], None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
                [need_dx, need_dw, False])
            if need_dx:
                dx[t] = a
            if need_dw:
                dw[t] = b
    db = dy.sum(dim=(1, 3, 4)) if need_bias else None
    return dx, dw, db


# -- C++ ops (csrc; schemas there, fake kernels here) ------------------------------------------

def _out_hw(h: int, k: int, stride: int, padding: int) -> int:
    return (h + 2 * padding - k) // stride + 1


def _fake_conv2d_tasks(x, w, b, stride, padding):
    T, N = x.shape[0], x.shape[1]
    return x.new_empty((T, N, w.shape[1], _out_hw(x.shape[3], w.shape[3], stride, padding),
                        _out_hw(x.shape[4], w.shape[4], stride, padding)))


def _fake_conv2d_tasks_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    dw = dy.new_empty(w.shape) if need_dw else dy.new_empty((0,))
    db = dy.new_empty((x.shape[0], w.shape[1])) if need_bias else dy.new_empty((0,))
    return dx, dw, db


# op name in torch.ops.fastmaml -> its fake kernel (torch.library.opcheck, tracing)
CPP_OPS: Dict[str, Callable] = {"conv2d_tasks": _fake_conv2d_tasks,
                                "conv2d_tasks_backward": _fake_conv2d_tasks_backward}


def _cpp_ops():
    return extension.ops("fastmaml", tuple(CPP_OPS))


def cpp_conv2d_forward(x: Tensor, w: Tensor, b: Opt, stride: int, padding: int) -> Tensor:
    return _cpp_ops().conv2d_tasks(x, w, b, stride, padding)


def cpp_conv2d_backward(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, need_dx: bool, need_dw: bool,
                        need_bias: bool) -> Tuple[Opt, Opt, Opt]:
    """The C++ kernel behind :func:`conv2d_backward`'s signature (the op returns an empty tensor for
    an output not asked for)."""
    dx, dw, db = _cpp_ops().conv2d_tasks_backward(dy, x, w, stride, padding, bool(need_dx), bool(need_dw),
                                                  bool(need_bias))
    return (dx if need_dx else None), (dw if need_dw else None), (db if need_bias else None)


# -- backend choice ----------------------------------------------------------------------------

# Output positions per task (N * Ho * Wo) from which one ATen convolution backward per task beats the
# grouped call over all tasks on the CPU. Measured at conv4's 64-channel layers, 1 thread, T = 32
# (bench/bench_layers.py): N = 5 at 14x14 (980) per-task 1.48x faster, at 7x7 (245) 1.32x, at 3x3 (45)
# grouped 2.1x faster; N = 10 at 7x7 (490) even; N = 75 at 3x3 (675) even. Both give the same bits.
PER_TASK_BACKWARD_MIN_POSITIONS = 512


def cpu_conv_backward(per_task):
    """The faster convolution backward per shape on the CPU (bench/bench_layers.py): the C++
    per-task kernel for one-input-channel layers (a weight gradient only, where the grouped
    convolution lowers to a slow depthwise kernel); for the others one ATen backward per task where
    each task's output has at least PER_TASK_BACKWARD_MIN_POSITIONS positions, oneDNN's grouped
    convolution backward over all tasks at once below (small maps, where per-call overhead rules)."""
    def conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        if x.shape[2] == 1:
            return per_task(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        if dy.shape[1] * dy.shape[3] * dy.shape[4] >= PER_TASK_BACKWARD_MIN_POSITIONS:
            return conv2d_backward_per_task(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
        return _torch_conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
    return conv2d_backward


_torch_conv2d_backward = conv2d_backward  # the grouped torch kernel, under a name the wrappers cannot shadow


def _cin1_forward(direct):
    def conv2d_forward(x, w, b, stride, padding):
        if x.shape[2] == 1 and w.shape[-1] == 3 and padding == 1:
            return direct(x, w, b, stride, padding)
        return _torch_conv2d_forward(x, w, b, stride, padding)
    return conv2d_forward


_torch_conv2d_forward = conv2d_forward


def _cin1_backward(wgrad):
    def conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias):
        if x.shape[2] == 1 and w.shape[-1] == 3 and padding == 1 and not need_dx and need_dw:
            db = dy.sum(dim=(1, 3, 4)) if need_bias else None
            return None, wgrad(dy, x, stride, padding), db
        return _torch_conv2d_backward(dy, x, w, stride, padding, need_dx, need_dw, need_bias)
    return conv2d_backward


def family_kernels(backend: str, triton_layers=None) -> Dict[str, Callable]:
    """name -> implementation of the convolution's swappable kernels on a concrete layer backend:
    'torch', 'cpp' (needs the C++ ops; the caller probes them) or 'triton' (``triton_layers``: the
    imported ``fastmaml.triton.layers``; shapes its direct kernel does not take run on torch)."""
    if backend == "cpp":
        return {"conv2d_forward": cpp_conv2d_forward, "conv2d_backward": cpu_conv_backward(cpp_conv2d_backward)}
    if backend == "triton":
        fwd1 = getattr(triton_layers, "conv2d_cin1_forward", None)
        wgrad1 = getattr(triton_layers, "conv2d_cin1_weight_grad", None)
        if fwd1 is not None and wgrad1 is not None:
            return {"conv2d_forward": _cin1_forward(fwd1), "conv2d_backward": _cin1_backward(wgrad1)}
    return {"conv2d_forward": conv2d_forward, "conv2d_backward": conv2d_backward}


# -- runner node -------------------------------------------------------------------------------

@dataclass
class ConvSaved(Saved):
    x: Optional[Tensor] = None              # the input [T, N, C, H, W] (after pre_pad)
    yshape: Optional[torch.Size] = None     # the output's shape [T, N, O, Ho, Wo]
    rx: Optional[Tensor] = None             # R{x} (R-forward, after pre_pad; None: zero)


@dataclass(frozen=True)
class Conv:
    weight: str
    bias: Optional[str]
    stride: int
    padding: int
    pre_pad: Optional[Tuple[int, int, int, int]] = None  # (left, right, top, bottom), before the convolution

    def _pad(self, x: Optional[Tensor]) -> Optional[Tensor]:
        return x if x is None or self.pre_pad is None else F.pad(x, self.pre_pad)

    def _crop(self, dx: Optional[Tensor]) -> Optional[Tensor]:
        """The gradient at the padded input, back on the unpadded positions (the padding's adjoint)."""
        if dx is None or self.pre_pad is None:
            return dx
        left, right, top, bottom = self.pre_pad
        return dx[..., top:dx.shape[-2] - bottom, left:dx.shape[-1] - right].contiguous()

    def forward(self, ctx: PassContext, h: Tensor, save: bool):
        h = self._pad(h)
        b = ctx.params[self.bias] if self.bias else None
        y = ctx.kernels.conv2d_forward(h, ctx.params[self.weight], b, self.stride, self.padding)
        return y, (ConvSaved(x=h, yshape=y.shape) if save else None)

    def backward(self, ctx: PassContext, s: ConvSaved, d: Tensor, need_dx: bool) -> Optional[Tensor]:
        w = ctx.params[self.weight]
        want_w, want_b = ctx.wants(self.weight), ctx.wants(self.bias)
        dx, dw, db = ctx.kernels.conv2d_backward(d, s.x, w, self.stride, self.padding,
                                                 need_dx=need_dx, need_dw=want_w, need_bias=want_b)
        ctx.put(self.weight if want_w else None, dw)
        ctx.put(self.bias if want_b else None, db)
        return self._crop(dx)

    def rforward(self, ctx: PassContext, s: ConvSaved, r: Optional[Tensor]) -> Optional[Tensor]:
        K, U = ctx.kernels, ctx.direction
        r = self._pad(r)
        s.rx = r
        uw, ub = U.get(self.weight), (U.get(self.bias) if self.bias else None)
        w = ctx.params[self.weight]
        # R{z} = conv(R{x}, w) + conv(x, u_w) + u_b; the bias direction rides in the
        # convolution's bias (no extra pass over the activation)
        if r is not None and uw is not None:
            # conv(R{x}, w) + conv(x, u_w) as one convolution over the stacked input channels
            return K.conv2d_forward(torch.cat([r, s.x], dim=2), torch.cat([w, uw], dim=2), ub,
                                    self.stride, self.padding)
        if r is not None:
            return K.conv2d_forward(r, w, ub, self.stride, self.padding)
        if uw is not None:
            return K.conv2d_forward(s.x, uw, ub, self.stride, self.padding)
        return None if ub is None else ub[:, None, :, None, None].expand(s.yshape)

    def rbackward(self, ctx: PassContext, s: ConvSaved, rd: Optional[Tensor], need_dx: bool) -> Optional[Tensor]:
        K = ctx.kernels
        w, dy = ctx.params[self.weight], s.d
        uw = ctx.direction.get(self.weight)
        want_w, want_b = ctx.wants(self.weight), ctx.wants(self.bias)
        rx, x = s.rx, s.x
        rdx = rdw = rdb = None
        if rd is not None and need_dx and uw is not None:
            # conv^T(R{dy}, w) + conv^T(dy, u_w): one transposed convolution over the stacked
            # output channels
            rdx = K.conv2d_backward(torch.cat([rd, dy], dim=2), x, torch.cat([w, uw], dim=1), self.stride,
                                    self.padding, need_dx=True, need_dw=False, need_bias=False)[0]
        elif need_dx and (rd is not None or uw is not None):
            src, wt = (rd, w) if rd is not None else (dy, uw)
            rdx = K.conv2d_backward(src, x, wt, self.stride, self.padding,
                                    need_dx=True, need_dw=False, need_bias=False)[0]
        if want_w and rd is not None and rx is not None:
            # wgrad(x, R{dy}) + wgrad(R{x}, dy): one weight gradient over the stacked examples
            rdw = K.conv2d_backward(torch.cat([rd, dy], dim=1), torch.cat([x, rx], dim=1), w, self.stride,
                                    self.padding, need_dx=False, need_dw=True, need_bias=False)[1]
        elif want_w and (rd is not None or rx is not None):
            src, inp = (rd, x) if rd is not None else (dy, rx)
            rdw = K.conv2d_backward(src, inp, w, self.stride, self.padding,
                                    need_dx=False, need_dw=True, need_bias=False)[1]
        if want_b and rd is not None:
            rdb = rd.sum(dim=(1, 3, 4))
        ctx.put(self.weight if want_w else None, rdw)
        ctx.put(self.bias if want_b else None, rdb)
        return self._crop(rdx)
