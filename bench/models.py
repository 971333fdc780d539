"""Standard MAML benchmark models (plain ``nn.Module``; no fastmaml imports).

``omniglot_conv4``  -- the 4-block conv net of Finn et al. (2017) for 28x28 Omniglot:
    4 x [Conv2d(3x3, padding=1, hidden filters) -> BatchNorm2d -> ReLU -> MaxPool2d(2)]
    28 -> 14 -> 7 -> 3 -> 1, so the flattened feature has ``hidden`` entries,
    then Linear(hidden, ways).

``sinusoid_mlp``    -- the 1-40-40-1 ReLU MLP of the MAML sinusoid regression task.

``omniglot_mlp_bn`` -- the paper's Omniglot network without convolutions (section 5.2): the
    flattened 28x28 image through 256-128-64-64 units, each Linear -> BatchNorm1d -> ReLU, then
    Linear(64, ways).

BatchNorm note: every BatchNorm2d is built with ``track_running_stats=False``.
It therefore always normalises with the statistics of the batch it is given
(per task, and separately for the support and the query forward passes), in
train and eval mode alike, and it has no running-stat buffers.  This is what
MAML implementations do in practice (transductive batch norm), and it is also
required by the ``torch.func`` baseline: under ``vmap`` a BatchNorm that
updates running statistics in place fails, because the buffers are shared by
all tasks of the vmapped batch.  All baselines use the same model, so they
compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["omniglot_conv4", "omniglot_mlp_bn", "sinusoid_mlp"]


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def omniglot_conv4(ways: int, hidden: int = 64, in_channels: int = 1) -> nn.Sequential:
    """Conv-4 for 28x28 inputs: (B, in_channels, 28, 28) -> (B, ways) logits."""
    return nn.Sequential(
        _conv_block(in_channels, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        nn.Flatten(),
        nn.Linear(hidden, ways),
    )


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """1-40-40-1 ReLU MLP: (B, 1) -> (B, 1)."""
    return nn.Sequential(
        nn.Linear(1, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


if __name__ == "__main__":  # quick shape check
    m = omniglot_conv4(5)
    print(m(torch.randn(3, 1, 28, 28)).shape)
    print(sinusoid_mlp()(torch.randn(4, 1)).shape)


def omniglot_mlp_bn(ways: int, hidden=(256, 128, 64, 64), in_features: int = 28 * 28) -> nn.Sequential:
    """(B, 1, 28, 28) -> (B, ways) logits through Flatten and Linear/BatchNorm1d/ReLU blocks."""
    layers = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b, track_running_stats=False), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], ways))
    return nn.Sequential(*layers)
