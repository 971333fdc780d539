"""conv4's ``padding="tf"`` (config ``conv_padding=tf``): TensorFlow's "SAME" padding of the MAML
code's stride-2 convolutions, checked against TensorFlow's documented rule written out here:

    out = ceil(n / s),  total = max((out - 1) * s + k - n, 0),  before = total // 2,  after = total - before

and the fused path's meta-gradient on it against the per-task autograd oracle, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.app import configs
from fastmaml.app.errors import UserError
from fastmaml.models import build, conv4


def tf_same(n: int, k: int = 3, s: int = 2):
    out = math.ceil(n / s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def conv_layers(model):
    """(padding module or None, Conv2d) per block, in order."""
    mods = list(model.features)
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            out.append((mods[i - 1] if i and isinstance(mods[i - 1], nn.ZeroPad2d) else None, m))
    return out


@pytest.mark.parametrize("side,channels", [(28, 1), (84, 3), (9, 1), (10, 2)])
def test_each_block_pads_as_tensorflow_same(side, channels):
    torch.manual_seed(side)
    model = conv4(5, hidden=4, in_channels=channels, max_pool=False, image_size=side, padding="tf").double()
    x = torch.randn(2, channels, side, side, dtype=torch.float64)
    n = side
    for pad, conv in conv_layers(model):
        before, after = tf_same(n)
        want = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, conv.bias, stride=2)
        got = conv(pad(x) if pad is not None else x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        x, n = torch.randn_like(got[:, :1].expand(-1, 4, -1, -1)).contiguous(), got.shape[-1]
    # the symmetric default pads 1 on every side, whatever the side: it differs on an even side
    sym = conv4(5, hidden=4, in_channels=channels, max_pool=False, image_size=side)
    assert all(p is None and c.padding == (1, 1) for p, c in conv_layers(sym))
    assert any(p is not None for p, _ in conv_layers(model)) == any(tf_same(m) != (1, 1) for m in _sides(side))


def _sides(side):
    out = []
    for _ in range(4):
        out.append(side)
        side = math.ceil(side / 2)
    return out


def test_max_pool_blocks_are_the_same_either_way():
    """Stride-1 3x3 SAME pads 1 on every side, as the default does."""
    assert tf_same(28, 3, 1) == (1, 1)
    torch.manual_seed(0)
    a = conv4(5, hidden=4, padding="tf")
    torch.manual_seed(0)
    b = conv4(5, hidden=4)
    assert str(a) == str(b)


def test_config_builds_it_with_the_same_initialization():
    c = configs.resolve("omniglot-5w1s", ["max_pool=false", "init=paper", "conv_padding=tf"])
    torch.manual_seed(3)
    tf_model = build(c)
    torch.manual_seed(3)
    sym_model = build(dict(c, conv_padding="symmetric"))
    assert sum(isinstance(m, nn.ZeroPad2d) for m in tf_model.modules()) == 3  # 28, 14 and 4 are even; 7 is odd
    assert all(torch.equal(p, q) for p, q in zip(tf_model.parameters(), sym_model.parameters()))
    with pytest.raises(UserError, match="conv_padding=tf: only for the conv4 network; this config's model is mlp_bn"):
        configs.resolve("omniglot-mlp-5w1s", ["conv_padding=tf"])
    with pytest.raises(ValueError, match="conv4: padding must be one of symmetric, tf, got 'same'"):
        conv4(5, padding="same")


@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (2, True)])
def test_fused_meta_gradient_matches_the_oracle(steps, first_order):
    """The paper code's Omniglot network with TF padding at 28x28 (float64, 5-way 1-shot, 3 tasks):
    the fused path runs it (no fallback) and its meta-gradient matches ``backend="reference"``."""
    torch.manual_seed(steps)
    model = conv4(5, hidden=6, max_pool=False, init="paper", padding="tf").double()
    for m in model.modules():  # non-zero biases and shifts: a dropped gradient must show
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.3)
    T, N, Q = 3, 5, 3
    sx = (torch.rand(T, N, 1, 28, 28, dtype=torch.float64) < 0.15).double()
    qx = (torch.rand(T, N * Q, 1, 28, 28, dtype=torch.float64) < 0.15).double()
    sy = torch.arange(N).expand(T, -1).contiguous()
    qy = torch.arange(N).repeat_interleave(Q).expand(T, -1).contiguous()
    grads = {}
    for backend in ("engine", "reference"):
        learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.4, inner_steps=steps, first_order=first_order,
                                backend=backend)
        if backend == "engine":
            assert learner.execution_path.startswith("fused")
        learner.meta_step(sx, sy, qx, qy)
        grads[backend] = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
    err = float((grads["engine"] - grads["reference"]).norm() / grads["reference"].norm())
    assert err < 1e-12, err
