"""The MAML paper's networks.

* :func:`conv4`: the few-shot image classifier of Vinyals et al. used by MAML: four blocks of a 3x3
  convolution (``hidden`` filters, "same" padding), BatchNorm and ReLU, each followed by 2x2
  max-pooling, then a linear layer. 28x28 Omniglot images end as 1x1x``hidden`` (so the head is
  ``Linear(hidden, ways)``); 84x84 mini-ImageNet images with 32 filters end as 5x5x32 (the head is
  ``Linear(32 * 25, ways)``). With ``max_pool=False`` the blocks use stride-2 convolutions instead
  and the last feature map is averaged over space, as the paper's public code does for Omniglot.
  ``padding="tf"`` pads those stride-2 convolutions as TensorFlow's "SAME" does (the code's): an
  even input side gets its one padding row and column at the bottom and right only
  (``nn.ZeroPad2d((0, 1, 0, 1))`` before an unpadded convolution), an odd one a row and column on
  every side; the default pads every side by 1. The output sizes are the same; the sampling grid
  of an even input moves by one pixel. (Stride-1 3x3 convolutions pad 1 on every side either way.)
* :func:`mlp`: the sinusoid regressor, 1-40-40-1 with ReLU.
* :func:`mlp_bn`: the paper's Omniglot network without convolutions (section 5.2): the flattened
  image through hidden layers of 256, 128, 64, 64 units, each Linear + BatchNorm + ReLU, then the
  output layer. An ``nn.Sequential`` of supported layers, so the engine runs it on the fused path.

BatchNorm has ``track_running_stats=False``: like the paper, it always normalizes with the statistics
of the current batch (one task's support or query set), in training and at test time alike.
Initialization is PyTorch's default for every layer unless ``init="paper"``: the MAML code's
initialization, :func:`paper_fc_init_` (mlp, mlp_bn) or :func:`paper_conv_init_` (conv4); see
docs/reproduction.md.

``per_step_bn=S`` (conv4, mlp_bn) puts :class:`PerStepBatchNorm` with S weight sets in place of each
BatchNorm: MAML++'s per-step BatchNorm weights (BNWB, Antoniou et al. 2019), one scale/shift set per
inner step, chosen by the step the engine sets (:mod:`fastmaml.step_context`).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .step_context import current_step, weight_set

__all__ = ["conv4", "mlp", "mlp_bn", "Conv4", "PerStepBatchNorm", "build", "paper_fc_init_", "paper_conv_init_",
           "INITS"]

INITS = ("torch", "paper")
CONV_PADDINGS = ("symmetric", "tf")
#: the ``init`` of a config saved before the key existed: PyTorch's defaults. The application's
#: configs say the same (``KEYS["init"].absent``; tests/test_configs.py checks that they agree), and
#: the library does not import them.
INIT_OF_OLD_CONFIGS = "torch"


def _check_sets(steps, name: str) -> int:
    """The number of per-step parameter sets S: an int >= 1 (not a bool)."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool):
        raise TypeError(f"{name} must be an int S >= 1 (one BatchNorm weight set per inner step), got {steps!r} "
                        f"({type(steps).__name__})")
    if steps < 1:
        raise ValueError(f"{name} must be an int S >= 1 (one BatchNorm weight set per inner step), got {steps}")
    return int(steps)


class PerStepBatchNorm(nn.Module):
    """BatchNorm with one scale/shift set per inner step: MAML++'s BNWB (Antoniou et al., ICLR 2019).

    For an input x (one task's batch) at inner step ``step`` (read from
    :func:`fastmaml.step_context.current_step`), with s = min(step, S - 1)::

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight[s] + bias[s]

    mean and the biased var are per channel over the batch (and the spatial positions): always the
    statistics of the batch given (``F.batch_norm`` with ``training=True``), in training and at test
    time alike, as the MAML++ code does. The engine runs each task's batch on its own, so the
    statistics are per task. Steps beyond the last set (more test steps than training steps) use the
    last set, S - 1.

    Args:
        num_features: C, the channels.
        steps: S >= 1, the number of weight sets (MAML++: the number of inner training steps).
        dims: 2 for images [N, C, H, W] (like ``nn.BatchNorm2d``), 1 for [N, C] or [N, C, L] (like
            ``nn.BatchNorm1d``).
        eps: added to the variance.
        affine: learn ``weight`` [S, C] (initialized to ones) and ``bias`` [S, C] (zeros); without,
            y is the normalized x.

    The inner loop does not adapt these parameters unless ``adapt_bn=True`` (MAML++'s default too):
    they are meta-learned, and row k receives the meta-gradient of the forwards that ran at step k
    (rows of steps that never run get a zero gradient).

    Outside every step context (a plain ``module(x)``) the layer raises: which set applies depends on
    where in the inner loop the call is, so it must be said (``with fastmaml.step_context.inner_step(k):``).

    Running statistics: none. The MAML++ code also tracks per-step running statistics (BNRS), but with
    its settings they are never read (every forward normalizes with the batch statistics), so they
    change no output and no gradient; they are left out here.
    """

    def __init__(self, num_features: int, steps: int, dims: int = 2, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"PerStepBatchNorm: num_features must be an int >= 1, got {num_features!r}")
        self.steps = _check_sets(steps, "PerStepBatchNorm: steps")
        if dims not in (1, 2) or isinstance(dims, bool):
            raise ValueError(f"PerStepBatchNorm: dims must be 1 ([N, C] or [N, C, L]) or 2 ([N, C, H, W]), "
                             f"got {dims!r}")
        if not eps > 0:
            raise ValueError(f"PerStepBatchNorm: eps must be > 0, got {eps!r}")
        self.num_features = int(num_features)
        self.dims = int(dims)
        self.eps = float(eps)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.steps, self.num_features))
            self.bias = nn.Parameter(torch.zeros(self.steps, self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, steps={self.steps}, dims={self.dims}, eps={self.eps}, affine={self.affine}"

    def row(self, step: Optional[int]) -> int:
        """The weight set of inner step ``step``: min(step, S - 1); raises for None (no step context)."""
        return weight_set(step, self.steps, "PerStepBatchNorm",
                          "run it as `with fastmaml.step_context.inner_step(k): model(x)`")

    def forward(self, x: Tensor) -> Tensor:
        want = (2, 3) if self.dims == 1 else (4,)
        if x.dim() not in want:
            shapes = "[N, C] or [N, C, L]" if self.dims == 1 else "[N, C, H, W]"
            raise ValueError(f"PerStepBatchNorm(dims={self.dims}) expects {shapes} input, got shape {list(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"PerStepBatchNorm expects {self.num_features} channels (dim 1), got shape {list(x.shape)}")
        s = self.row(current_step())
        w = self.weight[s] if self.affine else None
        b = self.bias[s] if self.affine else None
        # batch statistics (training=True) with no running buffers: nothing is read or updated
        return F.batch_norm(x, None, None, w, b, training=True, momentum=0.0, eps=self.eps)


def _batchnorm(channels: int, per_step_bn: Optional[int], dims: int) -> nn.Module:
    """BatchNorm of the paper's networks: batch statistics only; per-step weight sets when asked."""
    if per_step_bn is None:
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        return bn(channels, track_running_stats=False)
    return PerStepBatchNorm(channels, per_step_bn, dims)


def paper_fc_init_(model: nn.Module) -> nn.Module:
    """The MAML code's initialization of its fully connected networks, in place (Finn's ``maml.py``,
    ``construct_fc_weights`` and ``normalize``):

    * every ``nn.Linear``: weight ~ N(0, 0.01^2) truncated at two standard deviations (values beyond
      are redrawn, as ``tf.truncated_normal``), bias 0;
    * every BatchNorm (``nn.BatchNorm1d/2d``, :class:`PerStepBatchNorm`) as
      ``tf.contrib.layers.batch_norm`` builds it by default: no scale (weight fixed at 1 with
      ``requires_grad=False``: neither adapted nor meta-learned), a learned shift starting at 0, eps 1e-3.

    Why it matters with BatchNorm: a Linear layer followed by BatchNorm is invariant to the scale of its
    weight, so the gradient step's relative size goes as 1 / |W|^2; weights 2-7x smaller than PyTorch's
    default make the same inner learning rate 4-50x stronger on those layers. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
                if m.bias is not None:
                    m.bias.zero_()
    _paper_batchnorm_(model)
    return model


def paper_conv_init_(model: nn.Module, head: str = "normal") -> nn.Module:
    """The MAML code's initialization of its convolutional networks, in place (Finn's ``maml.py``,
    ``construct_conv_weights`` and ``utils.normalize``):

    * every ``nn.Conv2d``: Xavier/Glorot uniform (``xavier_initializer_conv2d``: fan_in = C_in * k * k,
      fan_out = C_out * k * k, which is what ``nn.init.xavier_uniform_`` computes for [C_out, C_in, k, k]),
      bias 0;
    * every ``nn.Linear`` (the head): ``head="normal"``: weight ~ N(0, 1) (``tf.random_normal``, not
      truncated: the code's Omniglot head), ``head="xavier"``: Glorot uniform (its mini-ImageNet head);
      bias 0;
    * every BatchNorm as in :func:`paper_fc_init_`: no scale (weight fixed at 1, ``requires_grad=False``),
      a learned shift starting at 0, eps 1e-3.

    Returns ``model``."""
    if head not in ("normal", "xavier"):
        raise ValueError(f"paper_conv_init_: head must be 'normal' (Omniglot) or 'xavier' (mini-ImageNet), got {head!r}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                if isinstance(m, nn.Linear) and head == "normal":
                    m.weight.normal_(0.0, 1.0)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
    _paper_batchnorm_(model)
    return model


def _paper_batchnorm_(model: nn.Module) -> None:
    """``tf.contrib.layers.batch_norm``'s defaults: no scale (weight 1, frozen), shift 0, eps 1e-3."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, PerStepBatchNorm)):
            m.eps = 1e-3
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                m.weight.requires_grad_(False)


def _check_init(init, where: str) -> str:
    if init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS} (PyTorch's defaults, or the MAML code's), got {init!r}")
    return init


def _pooled_side(size: int, blocks: int, max_pool: bool) -> int:
    for _ in range(blocks):
        # max-pool 2x2, stride 2, no padding: floor(n / 2); conv 3x3, stride 2, padding 1: ceil(n / 2)
        size = size // 2 if max_pool else (size + 1) // 2
    return size


class Conv4(nn.Module):
    """``features`` (the four conv blocks) then ``classifier`` (a linear layer)."""

    def __init__(self, ways: int, hidden: int = 64, in_channels: int = 1, max_pool: bool = True,
                 image_size: int = 28, blocks: int = 4, per_step_bn: Optional[int] = None,
                 padding: str = "symmetric") -> None:
        super().__init__()
        if padding not in CONV_PADDINGS:
            raise ValueError(f"conv4: padding must be one of {', '.join(CONV_PADDINGS)}, got {padding!r}")
        if ways < 1 or hidden < 1 or in_channels < 1 or blocks < 1:
            raise ValueError(f"conv4: ways, hidden, in_channels and blocks must be >= 1, got "
                             f"{ways}, {hidden}, {in_channels}, {blocks}")
        if per_step_bn is not None:
            per_step_bn = _check_sets(per_step_bn, "conv4: per_step_bn (None: ordinary BatchNorm)")
        side = _pooled_side(image_size, blocks, max_pool)
        if side < 1:
            raise ValueError(f"conv4: {image_size}x{image_size} images are too small for {blocks} max-pooling blocks")
        layers = []
        c, n = in_channels, image_size
        for _ in range(blocks):
            if max_pool:
                layers += [nn.Conv2d(c, hidden, 3, padding=1), _batchnorm(hidden, per_step_bn, 2),
                           nn.ReLU(), nn.MaxPool2d(2)]
            elif padding == "tf" and n % 2 == 0:
                # TensorFlow's SAME for a 3x3 stride-2 convolution of an even side n: (n/2 - 1) * 2 + 3 - n
                # = 1 padding row, placed after (bottom / right)
                layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, hidden, 3, stride=2, padding=0),
                           _batchnorm(hidden, per_step_bn, 2), nn.ReLU()]
            else:
                layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1), _batchnorm(hidden, per_step_bn, 2),
                           nn.ReLU()]
            c, n = hidden, (n // 2 if max_pool else (n + 1) // 2)
        self.features = nn.Sequential(*layers)
        self.max_pool = max_pool
        self.image_size = image_size
        self.padding = padding
        features = hidden * side * side if max_pool else hidden
        self.classifier = nn.Linear(features, ways)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.flatten(1) if self.max_pool else h.mean(dim=(2, 3))
        return self.classifier(h)


def conv4(ways: int, hidden: int = 64, in_channels: int = 1, max_pool: bool = True, image_size: int = 28,
          per_step_bn: Optional[int] = None, init: str = "torch", head_init: str = "normal",
          padding: str = "symmetric") -> Conv4:
    """The paper's 4-block conv net (see the module docstring). ``image_size``: the input side
    (28 for Omniglot, 84 for mini-ImageNet), which fixes the width of the linear head.
    ``per_step_bn``: None (BatchNorm2d) or S >= 1 (:class:`PerStepBatchNorm` with S weight sets).
    ``init``: "torch" (PyTorch's defaults) or "paper" (:func:`paper_conv_init_` with ``head_init``:
    "normal", the code's Omniglot head, or "xavier", its mini-ImageNet head). ``padding``: "symmetric"
    or "tf" (TensorFlow's SAME for the stride-2 convolutions; see the module docstring)."""
    _check_init(init, "conv4")
    net = Conv4(ways, hidden, in_channels, max_pool, image_size, per_step_bn=per_step_bn, padding=padding)
    return paper_conv_init_(net, head_init) if init == "paper" else net


def mlp(hidden: Sequence[int] = (40, 40), in_features: int = 1, out_features: int = 1,
        init: str = "torch") -> nn.Sequential:
    """The paper's sinusoid regressor: Linear layers of widths ``hidden`` with ReLU between them.
    ``init``: "torch" (PyTorch's defaults) or "paper" (:func:`paper_fc_init_`)."""
    _check_init(init, "mlp")
    widths = [in_features, *hidden]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_features))
    net = nn.Sequential(*layers)
    return paper_fc_init_(net) if init == "paper" else net


def mlp_bn(ways: int, hidden: Sequence[int] = (256, 128, 64, 64), in_features: int = 28 * 28,
           per_step_bn: Optional[int] = None, init: str = "torch") -> nn.Sequential:
    """The MAML paper's non-convolutional Omniglot classifier (section 5.2): Flatten, then for each
    width in ``hidden`` Linear + BatchNorm1d (batch statistics, ``track_running_stats=False``) + ReLU,
    then ``Linear(hidden[-1], ways)``. ``per_step_bn``: None (BatchNorm1d) or S >= 1
    (:class:`PerStepBatchNorm` with S weight sets, ``dims=1``). ``init``: "torch" (PyTorch's defaults)
    or "paper" (:func:`paper_fc_init_`: the MAML code's truncated N(0, 0.01^2), BatchNorm without scale)."""
    _check_init(init, "mlp_bn")
    if ways < 1 or in_features < 1 or not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"mlp_bn: ways, in_features and every hidden width must be >= 1, got "
                         f"{ways}, {in_features}, {list(hidden)}")
    if per_step_bn is not None:
        per_step_bn = _check_sets(per_step_bn, "mlp_bn: per_step_bn (None: ordinary BatchNorm)")
    layers: list = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), _batchnorm(b, per_step_bn, 1), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], ways))
    net = nn.Sequential(*layers)
    return paper_fc_init_(net) if init == "paper" else net


def build(config) -> nn.Module:
    """The network a config names (``model``, ``hidden``, ``ways``, ``image_size``, ``max_pool``,
    ``per_step_bn``: MAML++'s per-step BatchNorm weights with S = ``inner_steps`` sets)."""
    sets = config["inner_steps"] if config.get("per_step_bn", False) else None
    init = config.get("init", INIT_OF_OLD_CONFIGS)  # a run saved before the key existed
    if config["model"] == "mlp":
        if sets is not None:
            raise ValueError("per_step_bn needs a model with BatchNorm (conv4, mlp_bn); mlp has none")
        return mlp(tuple(config["hidden"]), init=init)
    if config["model"] == "mlp_bn":
        channels = 3 if config["dataset"] == "miniimagenet" else 1
        return mlp_bn(config["ways"], tuple(config["hidden"]), channels * config["image_size"] ** 2, per_step_bn=sets,
                      init=init)
    if config["model"] == "conv4":
        channels = 3 if config["dataset"] == "miniimagenet" else 1
        # the MAML code's head: N(0, 1) for Omniglot, Xavier for mini-ImageNet (construct_conv_weights)
        head = "xavier" if config["dataset"] == "miniimagenet" else "normal"
        return conv4(config["ways"], config["hidden"], channels, config.get("max_pool", True), config["image_size"],
                     per_step_bn=sets, init=init, head_init=head, padding=config.get("conv_padding", "symmetric"))
    raise ValueError(f"unknown model {config['model']!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":  # pragma: no cover - a quick look at the shapes
    for m, x in ((conv4(5), torch.zeros(2, 1, 28, 28)), (conv4(5, 32, 3, image_size=84), torch.zeros(2, 3, 84, 84)),
                 (conv4(5, max_pool=False), torch.zeros(2, 1, 28, 28)), (mlp(), torch.zeros(2, 1))):
        print(type(m).__name__, tuple(m(x).shape), count_parameters(m))
