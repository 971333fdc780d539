"""The MAML code's initialization (``init="paper"``: ``fastmaml.models.paper_fc_init_`` for the fully
connected networks, ``paper_conv_init_`` for conv4) and what it brings into the engine: BatchNorm with a
frozen scale beside a learned shift.

The meta-gradient oracle is written out here and shares no code with fastmaml: a per-task loop of
plain autograd through the unrolled inner loop in float64, the network by hand (``F.linear``,
BatchNorm written out with batch statistics, eps 1e-3 and no scale at all), reading
only the model's parameters by name. Gradients are compared as one vector, ||a - b|| / ||b|| <= 1e-10.
The shifts and biases start random (the paper's zeros would hide a dropped shift gradient).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmaml
from fastmaml.app import configs
from fastmaml.models import PerStepBatchNorm, build, conv4, mlp, mlp_bn, paper_conv_init_, paper_fc_init_
from fastmaml.step_context import inner_step

DT = torch.float64
TOL = 1e-10
HIDDEN = (64, 32)


# -- the initialization itself ---------------------------------------------------------------------

def test_linear_weights_are_truncated_normal_001_and_biases_zero():
    torch.manual_seed(0)
    net = mlp_bn(5, init="paper")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    for m in linears:
        assert m.weight.abs().max() <= 0.02  # truncated at two standard deviations
        assert torch.all(m.bias == 0)
    w = linears[0].weight.detach().double()  # 784 x 256 = 200,704 draws
    # N(0, 0.01^2) truncated at +-2 sigma has standard deviation 0.01 * 0.87962566
    assert abs(float(w.std()) - 0.0087962566) < 0.0087962566 * 0.01, float(w.std())
    assert abs(float(w.mean())) < 1e-4
    # the shape of a truncated normal, not a rescaled uniform (which puts 25% there):
    # P(|Z| > 1.5 | |Z| < 2) = (0.13361 - 0.04550) / 0.95450 = 0.0923
    beyond = float((w.abs() > 0.015).double().mean())
    assert 0.088 < beyond < 0.097, beyond


@pytest.mark.parametrize("per_step", [None, 3])
def test_batchnorm_has_no_scale_and_eps_1e3(per_step):
    net = mlp_bn(5, hidden=HIDDEN, per_step_bn=per_step, init="paper")
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, PerStepBatchNorm))]
    assert len(bns) == len(HIDDEN)
    for m in bns:
        assert m.eps == 1e-3
        assert torch.all(m.weight == 1) and not m.weight.requires_grad
        assert torch.all(m.bias == 0) and m.bias.requires_grad


def test_sinusoid_mlp_paper_init():
    net = mlp((40, 40), init="paper")
    for m in net.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.abs().max() <= 0.02 and torch.all(m.bias == 0)


def test_torch_init_is_unchanged_by_default():
    torch.manual_seed(5)
    a = mlp_bn(5, hidden=HIDDEN)
    torch.manual_seed(5)
    b = mlp_bn(5, hidden=HIDDEN, init="torch")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad, n
    assert a[1].weight.abs().max() > 0.02  # PyTorch's U(-1/sqrt(784), 1/sqrt(784)) reaches 0.0357


def test_bad_init_names_the_argument():
    with pytest.raises(ValueError, match=r"mlp_bn: init must be one of \('torch', 'paper'\).*'xavier'"):
        mlp_bn(5, init="xavier")
    with pytest.raises(ValueError, match="mlp: init must be one of"):
        mlp(init="Paper")
    with pytest.raises(ValueError, match="conv4: init must be one of"):
        conv4(5, init="xavier")
    with pytest.raises(ValueError, match="head must be 'normal'.*'uniform'"):
        paper_conv_init_(conv4(5), head="uniform")


# -- conv4: the code's construct_conv_weights ------------------------------------------------------

@pytest.mark.parametrize("dataset,head_std", [("omniglot", 1.0), ("miniimagenet", None)])
def test_conv4_paper_init_from_the_config(dataset, head_std):
    """Xavier-uniform convolutions (bound sqrt(6 / (fan_in + fan_out)), fan = channels * 9), zero
    biases, BatchNorm with a frozen unit scale, a zero shift and eps 1e-3; the head N(0, 1) on
    Omniglot, Xavier-uniform on mini-ImageNet."""
    torch.manual_seed(3)
    cfg = configs.apply_overrides(configs.get("omniglot-20w5s" if dataset == "omniglot" else "miniimagenet-5w1s"),
                                  ["init=paper"])
    net = build(cfg)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(bns) == 4
    for m in convs:
        bound = math.sqrt(6.0 / ((m.in_channels + m.out_channels) * 9))
        w = m.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        # uniform on [-b, b]: std b / sqrt(3) (within 10% for >= 576 draws)
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
        assert torch.count_nonzero(m.bias) == 0
    for m in bns:
        assert m.eps == 1e-3 and not m.weight.requires_grad and m.bias.requires_grad
        assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
    head = net.classifier
    assert torch.count_nonzero(head.bias) == 0
    w = head.weight.detach()
    if head_std is not None:
        assert head.weight.numel() == 20 * 64 and abs(w.std().item() - head_std) < 0.1
        assert w.abs().max() > 2.5  # not truncated: N(0, 1) reaches beyond 2 sigma in 1,280 draws
    else:
        bound = math.sqrt(6.0 / (head.in_features + head.out_features))
        assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    # the default stays PyTorch's
    plain = build(configs.get("omniglot-5w1s"))
    assert all(m.weight.requires_grad for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_conv4_paper_init_runs_exactly_on_the_fused_path():
    """The frozen BatchNorm scale of init=paper on conv4 (stride-2 variant, the code's Omniglot net):
    the fused path's meta-gradient equals the reference's in float64."""
    torch.manual_seed(4)
    net = conv4(5, hidden=6, max_pool=False, init="paper").double()
    g = torch.Generator().manual_seed(5)
    sx = torch.randn(3, 5, 1, 28, 28, generator=g, dtype=torch.float64)
    qx = torch.randn(3, 10, 1, 28, 28, generator=g, dtype=torch.float64)
    sy = torch.stack([torch.randperm(5, generator=g) for _ in range(3)])
    qy = torch.stack([torch.randperm(5, generator=g).repeat(2) for _ in range(3)])
    grads = []
    for kw in (dict(backend="reference"), dict(batching="fused")):
        lrn = fastmaml.MAML(copy.deepcopy(net), inner_lr=2.0, inner_steps=2, **kw)
        lrn.meta_step(sx, sy, qx, qy)
        grads.append(torch.cat([p.grad.flatten() for p in lrn.parameters() if p.requires_grad]))
    assert lrn.execution_path.startswith("fused")
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) <= 1e-10


def test_config_key_and_runs_saved_before_it():
    cfg = configs.apply_overrides(configs.get("omniglot-mlp-5w1s"), ["init=paper"])
    assert cfg["init"] == "paper"
    net = build(cfg)
    assert not net[2].weight.requires_grad
    with pytest.raises(configs.UserError, match="init"):
        configs.apply_overrides(configs.get("omniglot-mlp-5w1s"), ["init=xavier"])
    # a run saved before the key existed used PyTorch's defaults: it resumes under init=torch only
    old = {k: v for k, v in configs.get("omniglot-mlp-5w1s").items() if k != "init"}
    assert configs.differences(old, dict(old, init="torch")) == []
    assert configs.differences(old, dict(old, init="paper")) == [("init", "torch", "paper")]


# -- the meta-gradient with a frozen scale ---------------------------------------------------------

def _shift(p: Dict[str, Tensor], name: str, step: int) -> Tensor:
    b = p[name + ".bias"]
    return b[min(step, b.shape[0] - 1)] if b.dim() == 2 else b


def shift_only_bn(h: Tensor, shift: Tensor) -> Tensor:
    """Batch statistics (biased variance), eps 1e-3, no scale. Written out: ``F.batch_norm`` with
    ``weight=None`` has no double backward for its bias in torch 2.13."""
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    return (h - mean) / torch.sqrt(var + 1e-3) + shift


def net_by_hand(p: Dict[str, Tensor], x: Tensor, step: int) -> Tensor:
    """mlp_bn(HIDDEN) with no BatchNorm scale: flatten, (linear, shift-only BN, ReLU) x 2, linear."""
    h = x.flatten(1)
    for j in range(len(HIDDEN)):
        i = 1 + 3 * j
        h = F.linear(h, p[f"{i}.weight"], p[f"{i}.bias"])
        h = F.relu(shift_only_bn(h, _shift(p, f"{i + 1}", step)))
    i = 1 + 3 * len(HIDDEN)
    return F.linear(h, p[f"{i}.weight"], p[f"{i}.bias"])


def oracle(params: Dict[str, Tensor], adapted: List[str], lr: float, K: int, first_order: bool, batch):
    """d/d(params) of (1/T) sum_t CE(query after K updates), by unrolled autograd, task by task."""
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    J = 0.0
    for t in range(T):
        fast = dict(leaves)
        for k in range(K):
            gs = torch.autograd.grad(F.cross_entropy(net_by_hand(fast, sx[t], k), sy[t]), [fast[n] for n in adapted],
                                     create_graph=not first_order)
            fast = dict(fast, **{n: fast[n] - lr * g for n, g in zip(adapted, gs)})
        J = J + F.cross_entropy(net_by_hand(fast, qx[t], max(K - 1, 0)), qy[t]) / T
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(J, [leaves[n] for n in names])))


def model(per_step, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = mlp_bn(5, hidden=HIDDEN, per_step_bn=per_step, init="paper").double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
    return net


def batch(T: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    sx = torch.rand(T, 10, 1, 28, 28, generator=g, dtype=DT) ** 3  # sparse-ish strokes, not uniform noise
    qx = torch.rand(T, 15, 1, 28, 28, generator=g, dtype=DT) ** 3
    sy = torch.arange(5).repeat_interleave(2).expand(T, -1).contiguous()
    qy = torch.arange(5).repeat_interleave(3).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def rel_err(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    fa = torch.cat([a[k].flatten() for k in b])
    fb = torch.cat([b[k].flatten() for k in b])
    return float((fa - fb).norm() / fb.norm())


@pytest.mark.parametrize("per_step", [None, 2])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_meta_gradient_with_frozen_scale_every_path(per_step, K, first_order, memory):
    net = model(per_step, seed=K + 10 * (per_step or 0))
    b = batch(seed=K)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    adapted = [n for n in trainable if not isinstance(net.get_submodule(n.rsplit(".", 1)[0]),
                                                      (nn.BatchNorm1d, PerStepBatchNorm))]
    want = oracle(trainable, adapted, 0.4, K, first_order, b)
    for batching in ("fused", "vmap", "loop"):
        learner = fastmaml.MAML(copy.deepcopy(net), inner_lr=0.4, inner_steps=K, first_order=first_order,
                                memory=memory, batching=batching)
        learner.meta_step(*b)
        assert learner.execution_path.startswith("fused" if batching == "fused" else "generic"), \
            learner.execution_path
        frozen = [n for n, p in learner.model.named_parameters() if not p.requires_grad]
        assert len(frozen) == len(HIDDEN)
        for n in frozen:
            assert learner.model.get_parameter(n).grad is None, (batching, n)
        got = {n: p.grad for n, p in learner.model.named_parameters() if p.requires_grad}
        # the shifts' share of the gradient is what a dropped shift would lose: it must be non-trivial
        assert all(float(got[n].abs().sum()) > 0 for n in got if n not in adapted), batching
        err = rel_err(got, want)
        assert err <= TOL, f"{batching}: relative error {err:.3e}"


def test_adapted_shift_beside_frozen_scale():
    """adapt_bn=True: the inner loop adapts the shifts (the frozen scales stay out of the layout)."""
    net = model(None, seed=3)
    b = batch(seed=4)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    want = oracle(trainable, list(trainable), 0.4, 2, False, b)
    for batching in ("fused", "vmap"):
        learner = fastmaml.MAML(copy.deepcopy(net), inner_lr=0.4, inner_steps=2, adapt_bn=True, batching=batching)
        assert "2.bias" in learner.adapted_names and "2.weight" not in learner.adapted_names
        learner.meta_step(*b)
        got = {n: p.grad for n, p in learner.model.named_parameters() if p.requires_grad}
        assert rel_err(got, want) <= TOL, batching


def test_per_step_rows_are_used_with_frozen_scale():
    """The by-hand net reads per-step shifts by row; a check that a wrong row would show."""
    net = model(2, seed=1)
    x = batch()[0][0]
    p = dict(net.named_parameters())
    with inner_step(1):
        out = net(x)
    assert torch.allclose(out, net_by_hand(p, x, 1), rtol=0, atol=1e-12)
    assert not torch.allclose(out, net_by_hand(p, x, 0), rtol=0, atol=1e-6)
