"""The MAML paper's networks.

* :func:`conv4`: the few-shot image classifier of Vinyals et al. used by MAML: four blocks of a 3x3
  convolution (``hidden`` filters, "same" padding), BatchNorm and ReLU, each followed by 2x2
  max-pooling, then a linear layer. 28x28 Omniglot images end as 1x1x``hidden`` (so the head is
  ``Linear(hidden, ways)``); 84x84 mini-ImageNet images with 32 filters end as 5x5x32 (the head is
  ``Linear(32 * 25, ways)``). With ``max_pool=False`` the blocks use stride-2 convolutions instead
  and the last feature map is averaged over space, as the paper's public code does for Omniglot.
* :func:`mlp`: the sinusoid regressor, 1-40-40-1 with ReLU.
* :func:`mlp_bn`: the paper's Omniglot network without convolutions (section 5.2): the flattened
  image through hidden layers of 256, 128, 64, 64 units, each Linear + BatchNorm + ReLU, then the
  output layer. An ``nn.Sequential`` of supported layers, so the engine runs it on the fused path.

BatchNorm has ``track_running_stats=False``: like the paper, it always normalizes with the statistics
of the current batch (one task's support or query set), in training and at test time alike.
Initialization is PyTorch's default for every layer (see docs/reproduction.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["conv4", "mlp", "mlp_bn", "Conv4", "build"]


def _pooled_side(size: int, blocks: int, max_pool: bool) -> int:
    for _ in range(blocks):
        # max-pool 2x2, stride 2, no padding: floor(n / 2); conv 3x3, stride 2, padding 1: ceil(n / 2)
        size = size // 2 if max_pool else (size + 1) // 2
    return size


class Conv4(nn.Module):
    """``features`` (the four conv blocks) then ``classifier`` (a linear layer)."""

    def __init__(self, ways: int, hidden: int = 64, in_channels: int = 1, max_pool: bool = True,
                 image_size: int = 28, blocks: int = 4) -> None:
        super().__init__()
        if ways < 1 or hidden < 1 or in_channels < 1 or blocks < 1:
            raise ValueError(f"conv4: ways, hidden, in_channels and blocks must be >= 1, got "
                             f"{ways}, {hidden}, {in_channels}, {blocks}")
        side = _pooled_side(image_size, blocks, max_pool)
        if side < 1:
            raise ValueError(f"conv4: {image_size}x{image_size} images are too small for {blocks} max-pooling blocks")
        layers = []
        c = in_channels
        for _ in range(blocks):
            if max_pool:
                layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                           nn.ReLU(), nn.MaxPool2d(2)]
            else:
                layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1),
                           nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
            c = hidden
        self.features = nn.Sequential(*layers)
        self.max_pool = max_pool
        self.image_size = image_size
        features = hidden * side * side if max_pool else hidden
        self.classifier = nn.Linear(features, ways)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.flatten(1) if self.max_pool else h.mean(dim=(2, 3))
        return self.classifier(h)


def conv4(ways: int, hidden: int = 64, in_channels: int = 1, max_pool: bool = True, image_size: int = 28) -> Conv4:
    """The paper's 4-block conv net (see the module docstring). ``image_size``: the input side
    (28 for Omniglot, 84 for mini-ImageNet), which fixes the width of the linear head."""
    return Conv4(ways, hidden, in_channels, max_pool, image_size)


def mlp(hidden: Sequence[int] = (40, 40), in_features: int = 1, out_features: int = 1) -> nn.Sequential:
    """The paper's sinusoid regressor: Linear layers of widths ``hidden`` with ReLU between them."""
    widths = [in_features, *hidden]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def mlp_bn(ways: int, hidden: Sequence[int] = (256, 128, 64, 64), in_features: int = 28 * 28) -> nn.Sequential:
    """The MAML paper's non-convolutional Omniglot classifier (section 5.2): Flatten, then for each
    width in ``hidden`` Linear + BatchNorm1d (batch statistics, ``track_running_stats=False``) + ReLU,
    then ``Linear(hidden[-1], ways)``."""
    if ways < 1 or in_features < 1 or not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"mlp_bn: ways, in_features and every hidden width must be >= 1, got "
                         f"{ways}, {in_features}, {list(hidden)}")
    layers: list = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b, track_running_stats=False), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], ways))
    return nn.Sequential(*layers)


def build(config) -> nn.Module:
    """The network a config names (``model``, ``hidden``, ``ways``, ``image_size``, ``max_pool``)."""
    if config["model"] == "mlp":
        return mlp(tuple(config["hidden"]))
    if config["model"] == "mlp_bn":
        channels = 3 if config["dataset"] == "miniimagenet" else 1
        return mlp_bn(config["ways"], tuple(config["hidden"]), channels * config["image_size"] ** 2)
    if config["model"] == "conv4":
        channels = 3 if config["dataset"] == "miniimagenet" else 1
        return conv4(config["ways"], config["hidden"], channels, config.get("max_pool", True), config["image_size"])
    raise ValueError(f"unknown model {config['model']!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":  # pragma: no cover - a quick look at the shapes
    for m, x in ((conv4(5), torch.zeros(2, 1, 28, 28)), (conv4(5, 32, 3, image_size=84), torch.zeros(2, 3, 84, 84)),
                 (conv4(5, max_pool=False), torch.zeros(2, 1, 28, 28)), (mlp(), torch.zeros(2, 1))):
        print(type(m).__name__, tuple(m(x).shape), count_parameters(m))
