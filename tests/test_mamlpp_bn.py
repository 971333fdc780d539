"""MAML++'s per-step BatchNorm weights (BNWB, ``fastmaml.models.PerStepBatchNorm``) in every path.

The oracle here is written out in this file and shares no code with fastmaml's engine, runner,
kernels or reference: a per-task loop over plain autograd through the unrolled inner loop, in float64,
with the network written by hand (``F.conv2d`` / ``F.linear``, and BatchNorm as
``F.batch_norm(h, None, None, weight[s], bias[s], training=True)``). Its step convention is the
MAML++ code's: the support pass of inner step k uses set k, the query pass after k + 1 updates set k;
a layer with S sets uses set min(step, S - 1). It reads only the model's parameters (by name).

Every meta-gradient (all parameters, the per-step BatchNorm rows included, and learnable rates)
is compared as one vector: ||a - b|| / ||b|| <= 1e-10. BatchNorm rows start random and different
from each other, so a step mix-up (a wrong row) shows.
"""

from __future__ import annotations

import copy
import itertools
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmaml
from fastmaml.app import configs
from fastmaml.models import Conv4, PerStepBatchNorm, build, conv4, mlp_bn
from fastmaml.step_context import current_step, inner_step, query_step

TOL = 1e-10
DT = torch.float64
EPS = 1e-5


# -- the independent oracle ------------------------------------------------------------------------

def _bn(h: Tensor, p: Dict[str, Tensor], name: str, step: int) -> Tensor:
    w = p[name + ".weight"]
    s = min(step, w.shape[0] - 1)  # more steps than sets: the last set
    return F.batch_norm(h, None, None, w[s], p[name + ".bias"][s], training=True, eps=EPS)


def conv_net(blocks: int) -> Callable[[Dict[str, Tensor], Tensor, int], Tensor]:
    """Conv4(max_pool=True, blocks) by hand: (3x3 conv pad 1, per-step BN, ReLU, 2x2 max-pool) x blocks,
    flatten, linear."""
    def f(p: Dict[str, Tensor], x: Tensor, step: int) -> Tensor:
        h = x
        for b in range(blocks):
            i = 4 * b
            h = F.conv2d(h, p[f"features.{i}.weight"], p[f"features.{i}.bias"], padding=1)
            h = F.max_pool2d(F.relu(_bn(h, p, f"features.{i + 1}", step)), 2)
        return F.linear(h.flatten(1), p["classifier.weight"], p["classifier.bias"])
    return f


def mlp_net(layers: int) -> Callable[[Dict[str, Tensor], Tensor, int], Tensor]:
    """mlp_bn by hand: flatten, (linear, per-step BN, ReLU) x layers, linear."""
    def f(p: Dict[str, Tensor], x: Tensor, step: int) -> Tensor:
        h = x.flatten(1)
        for j in range(layers):
            i = 1 + 3 * j
            h = F.relu(_bn(F.linear(h, p[f"{i}.weight"], p[f"{i}.bias"]), p, f"{i + 1}", step))
        i = 1 + 3 * layers
        return F.linear(h, p[f"{i}.weight"], p[f"{i}.bias"])
    return f


def oracle(net, params: Dict[str, Tensor], adapted: Sequence[str], lr: Tensor, K: int, first_order: bool,
           weights: Sequence[float], batch) -> Dict[str, Tensor]:
    """d/d(params, lr) of J = (1/T) sum_t sum_k w_k CE(query after k updates), by unrolled autograd.

    ``lr``: [K] (the rate of step k, every adapted tensor). The support pass of step k runs at step k,
    the query pass after k + 1 updates at step k."""
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    lr = lr.detach().clone().requires_grad_(True)
    J = 0.0
    for t in range(T):
        fast = dict(leaves)
        for k in range(K):
            ls = F.cross_entropy(net(fast, sx[t], k), sy[t])
            gs = torch.autograd.grad(ls, [fast[n] for n in adapted], create_graph=not first_order)
            fast = dict(fast)
            for n, g in zip(adapted, gs):
                fast[n] = fast[n] - lr[k] * g
            if weights[k] != 0.0:
                J = J + weights[k] * F.cross_entropy(net(fast, qx[t], k), qy[t]) / T
    names = list(leaves)
    grads = torch.autograd.grad(J, [leaves[n] for n in names] + [lr], allow_unused=True)
    out = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads[:-1])}
    out["<lr>"] = torch.zeros_like(lr) if grads[-1] is None else grads[-1]
    return out


# -- models and data -------------------------------------------------------------------------------

def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Every per-step BatchNorm row different (ones/zeros would hide a wrong row)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PerStepBatchNorm):
                m.weight.copy_(1 + 0.4 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.4 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return model


def make(kind: str, S: int, seed: int = 0):
    """(model, hand-written net) in float64."""
    torch.manual_seed(seed)
    if kind == "conv":
        model = Conv4(3, hidden=3, in_channels=1, image_size=8, blocks=2, per_step_bn=S)
        net = conv_net(2)
    else:
        model = mlp_bn(3, hidden=(5, 4), in_features=64, per_step_bn=S)
        net = mlp_net(2)
    return randomize_bn(model.double(), seed + 1), net


def batch(T: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    sx = torch.randn(T, ways * shots, 1, 8, 8, generator=g, dtype=DT)
    qx = torch.randn(T, ways * queries, 1, 8, 8, generator=g, dtype=DT)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def rates(K: int) -> List[float]:
    return [0.3 / (1 + 0.37 * k) for k in range(K)]  # a different rate per step


def engine_grads(learner: fastmaml.MAML) -> Dict[str, Tensor]:
    out = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    if learner.inner_lr.learnable:
        out["<lr>"] = learner.inner_lr.lr.grad.clone()
    return out


def rel_err(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    fa = torch.cat([a[k].flatten() for k in b])
    fb = torch.cat([b[k].flatten() for k in b])
    return float((fa - fb).norm() / fb.norm())


def meta_step(model, batch_, K, first_order, weights, memory="store", batching="auto", backend="engine",
              adapt_bn=False, learn_lr=True):
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=rates(K), inner_steps=K, first_order=first_order,
                            learn_lr=learn_lr, lr_mode="per_step", multi_step_weights=weights, memory=memory,
                            batching=batching, backend=backend, adapt_bn=adapt_bn)
    learner.meta_step(*batch_)
    return learner


def expected(model, net, K, first_order, weights, batch_, adapt_bn=False):
    params = {n: p for n, p in model.named_parameters()}
    adapted = [n for n in params if adapt_bn or not _is_bn(model, n)]
    return oracle(net, params, adapted, torch.tensor(rates(K), dtype=DT), K, first_order, weights, batch_)


def _is_bn(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), PerStepBatchNorm)


def weights_for(K: int, multi: bool) -> List[float]:
    if not multi:
        return [0.0] * (K - 1) + [1.0]
    w = [0.1 + 0.2 * k for k in range(K)]
    return [v / sum(w) for v in w]


# -- the meta-gradient in every path ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("K,multi", [(1, False), (2, False), (2, True), (3, False), (3, True)])  # K = 1: one loss
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_meta_gradient_all_paths(kind, K, multi, first_order, memory):
    model, net = make(kind, S=K, seed=K)
    b = batch(seed=K)
    w = weights_for(K, multi)
    want = expected(model, net, K, first_order, w, b)
    for batching in ("fused", "vmap", "loop"):
        learner = meta_step(model, b, K, first_order, w, memory, batching)
        path = learner.execution_path
        assert path.startswith("fused" if batching == "fused" else f"generic ({batching})"), path
        err = rel_err(engine_grads(learner), want)
        assert err <= TOL, f"{batching}: relative error {err:.3e}"


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("K,S", [(3, 2), (1, 3), (2, 4)])
def test_sets_and_steps_differ(kind, K, S):
    """S < K: the steps beyond S - 1 use the last set; S > K: rows K..S-1 never run and get zero gradient."""
    model, net = make(kind, S=S, seed=7)
    b = batch(seed=3)
    w = weights_for(K, multi=K > 1)
    want = expected(model, net, K, False, w, b)
    for batching in ("fused", "vmap", "loop"):
        learner = meta_step(model, b, K, False, w, "store", batching)
        got = engine_grads(learner)
        assert rel_err(got, want) <= TOL, batching
        for n, m in learner.model.named_modules():
            if isinstance(m, PerStepBatchNorm):
                for name in ("weight", "bias"):
                    g = got[f"{n}.{name}"]
                    used = min(K, S)
                    assert torch.all(g[used:] == 0), (batching, n, name)  # exactly zero, not small
                    assert torch.all(g[:used].abs().sum(1) > 0), (batching, n, name)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("K", [2, 3])
def test_adapted_per_step_bn(kind, K):
    """adapt_bn=True: the inner loop adapts the [S, C] weights too (only row k moves at step k)."""
    model, net = make(kind, S=K, seed=11)
    b = batch(seed=5)
    w = weights_for(K, multi=True)
    want = expected(model, net, K, False, w, b, adapt_bn=True)
    for batching, memory in itertools.product(("fused", "vmap", "loop"), ("store", "recompute")):
        learner = meta_step(model, b, K, False, w, memory, batching, adapt_bn=True)
        assert any(n.endswith("features.1.weight") or n == "2.weight" for n in learner.adapted_names)
        assert rel_err(engine_grads(learner), want) <= TOL, (batching, memory)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("first_order", [False, True])
def test_reference_backend_honors_the_step(kind, first_order):
    K = 3
    model, net = make(kind, S=K, seed=13)
    b = batch(seed=6)
    w = weights_for(K, multi=True)
    want = expected(model, net, K, first_order, w, b)
    learner = meta_step(model, b, K, first_order, w, backend="reference")
    assert rel_err(engine_grads(learner), want) <= TOL


def test_full_size_conv4_fused():
    """The four-block conv4 builder itself (16x16 inputs), second order, K = 2, MAML++'s LSLR rates."""
    K = 2
    torch.manual_seed(3)
    model = randomize_bn(conv4(3, hidden=3, image_size=16, per_step_bn=K).double(), 4)
    g = torch.Generator().manual_seed(9)
    sx, qx = (torch.randn(2, 6, 1, 16, 16, generator=g, dtype=DT) for _ in range(2))
    y = torch.arange(3).repeat_interleave(2).expand(2, -1).contiguous()
    b = (sx, y, qx, y)
    w = [0.4, 0.6]
    want = expected(model, conv_net(4), K, False, w, b)
    learner = meta_step(model, b, K, False, w, batching="auto")
    assert learner.execution_path.startswith("fused"), learner.execution_path
    assert rel_err(engine_grads(learner), want) <= TOL


# -- adapt / predict / evaluate use the same convention -------------------------------------------

@pytest.mark.parametrize("batching", ["fused", "vmap", "loop"])
@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_adapt_and_predict_steps(batching, steps):
    """adapt's support passes run at steps 0..K-1; predict after K updates at step K - 1 (0 for K = 0);
    S = 2 < 3 steps: step 2 uses set 1. Checked against the hand-written net, task by task."""
    model, net = make("conv", S=2, seed=17)
    sx, sy, qx, qy = batch(seed=8)
    learner = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=3, batching=batching)
    fast = learner.adapt(sx, sy, steps=steps)
    pred = learner.predict(fast, qx)
    params = dict(model.named_parameters())
    names = learner.adapted_names
    for t in range(sx.shape[0]):
        p = {n: v.detach().clone().requires_grad_(n in names) for n, v in params.items()}
        for k in range(steps):
            loss = F.cross_entropy(net(p, sx[t], k), sy[t])
            gs = torch.autograd.grad(loss, [p[n] for n in names])
            p = {**p, **{n: (p[n] - 0.3 * g).detach().requires_grad_(True) for n, g in zip(names, gs)}}
        want = net(p, qx[t], query_step(steps)).detach()
        assert torch.allclose(pred[t], want, rtol=0, atol=1e-12), (t, steps)
        if steps > 0:  # the support losses of the last step, as adapt measured them
            assert torch.allclose(fast.support_losses[-1, t], loss.detach(), rtol=0, atol=1e-12)
    # the differentiable forward (adapt with create_graph) runs the query at the same step
    if steps > 0:
        fast_g = learner.adapt(sx, sy, steps=steps, create_graph=True)
        assert torch.allclose(learner(fast_g, qx).detach(), pred, rtol=0, atol=1e-12)


def test_evaluate_matches_predict():
    model, _ = make("mlp", S=2, seed=19)
    sx, sy, qx, qy = batch(seed=9)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2)
    out = learner.evaluate(sx, sy, qx, qy, steps=3)
    pred = learner.predict(learner.adapt(sx, sy, steps=3), qx)
    losses = torch.stack([F.cross_entropy(pred[t], qy[t]) for t in range(qx.shape[0])])
    assert torch.allclose(out.task_losses, losses, rtol=0, atol=1e-12)


# -- the module, the fused program, the builders and the configs ----------------------------------

def test_module_forward_and_step_context():
    torch.manual_seed(0)
    m = randomize_bn(PerStepBatchNorm(3, steps=2, dims=2).double(), 0)
    x = torch.randn(5, 3, 4, 4, dtype=DT)
    assert current_step() is None
    with pytest.raises(RuntimeError, match="outside an inner-step context"):
        m(x)
    for step, row in ((0, 0), (1, 1), (2, 1), (9, 1)):
        with inner_step(step):
            assert current_step() == step
            want = F.batch_norm(x, None, None, m.weight[row], m.bias[row], training=True, eps=EPS)
            assert torch.equal(m(x), want)
    with inner_step(1):
        with inner_step(0):
            assert current_step() == 0
        assert current_step() == 1  # nested contexts restore the outer step
    assert current_step() is None
    m1 = PerStepBatchNorm(3, steps=1, dims=1, affine=False).double()
    with inner_step(4):
        x1 = torch.randn(6, 3, dtype=DT)
        assert torch.allclose(m1(x1), (x1 - x1.mean(0)) / torch.sqrt(x1.var(0, unbiased=False) + EPS), atol=1e-14)
        with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
            m(x1)
    assert query_step(0) == 0 and query_step(1) == 0 and query_step(4) == 3


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                     ("3", TypeError), (None, TypeError)])
def test_bad_number_of_sets(bad, err):
    with pytest.raises(err, match="S >= 1"):
        PerStepBatchNorm(4, bad)
    if bad is not None:  # None is the builders' "ordinary BatchNorm"
        with pytest.raises(err, match="per_step_bn"):
            conv4(5, hidden=4, per_step_bn=bad)
        with pytest.raises(err, match="per_step_bn"):
            mlp_bn(5, hidden=(4,), per_step_bn=bad)


def test_bad_step_and_dims():
    with pytest.raises(ValueError, match="dims"):
        PerStepBatchNorm(4, 2, dims=3)
    with pytest.raises(ValueError, match=">= 0"):
        with inner_step(-1):
            pass
    with pytest.raises(TypeError, match="int"):
        with inner_step(1.0):
            pass


def test_fused_program_and_runner_need_a_step():
    from fastmaml.layers.program import BatchNormBlock, compile_model

    model, _ = make("conv", S=3)
    nodes = [n for n in compile_model(model) if isinstance(n, BatchNormBlock)]
    assert [(n.steps, n.pool, n.slope) for n in nodes] == [(3, 2, 0.0)] * 2  # BN + ReLU + max-pool fused
    nodes = [n for n in compile_model(make("mlp", S=2)[0]) if isinstance(n, BatchNormBlock)]
    assert [(n.steps, n.pool) for n in nodes] == [(2, 0)] * 2
    learner = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, batching="fused")
    sx, sy, _, _ = batch()
    with pytest.raises(RuntimeError, match="without an inner step"):
        learner.engine.forward(learner.engine.theta(), sx)
    out = learner.engine.forward(learner.engine.theta(), sx, step=5)  # clamps to set 2
    with inner_step(2):
        want = torch.stack([model(sx[t]) for t in range(sx.shape[0])])
    assert torch.allclose(out, want, rtol=0, atol=1e-12)


def test_builders_and_configs():
    m = conv4(5, hidden=4, per_step_bn=3)
    bns = [x for x in m.modules() if isinstance(x, PerStepBatchNorm)]
    assert len(bns) == 4 and all(b.weight.shape == (3, 4) and b.dims == 2 for b in bns)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert all(isinstance(x, nn.BatchNorm2d) for x in conv4(5, hidden=4).features if "Norm" in type(x).__name__)
    m = mlp_bn(5, hidden=(6, 4), per_step_bn=2)
    assert [tuple(b.weight.shape) for b in m.modules() if isinstance(b, PerStepBatchNorm)] == [(2, 6), (2, 4)]
    for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)):
        cfg = configs.get(f"mamlpp-omniglot-{ways}w{shots}s")
        assert cfg["per_step_bn"] is True
        model = build(cfg)
        bns = [x for x in model.modules() if isinstance(x, PerStepBatchNorm)]
        assert len(bns) == 4 and all(b.steps == cfg["inner_steps"] for b in bns)
    cfg = configs.apply_overrides(configs.get("mamlpp-omniglot-5w1s"), ["inner_steps=3"])
    assert {b.steps for b in build(cfg).modules() if isinstance(b, PerStepBatchNorm)} == {3}
    cfg = configs.apply_overrides(configs.get("mamlpp-omniglot-5w1s"), ["per_step_bn=false"])
    assert not any(isinstance(x, PerStepBatchNorm) for x in build(cfg).modules())
    # only the MAML++ configs have the key (like the other algorithms' keys)
    assert all("per_step_bn" not in configs.get(n) for n in configs.names() if not n.startswith("mamlpp-"))
    cfg = dict(configs.get("mamlpp-omniglot-5w1s"), model="mlp_bn", hidden=[6, 4])
    configs.check_config(cfg)
    assert {b.steps for b in build(cfg).modules() if isinstance(b, PerStepBatchNorm)} == {cfg["inner_steps"]}
    with pytest.raises(configs.UserError, match="per_step_bn"):
        configs.check_config(dict(cfg, model="mlp", hidden=[40, 40]))


def test_config_learner_meta_step_runs_fused():
    """The CLI's construction (configs -> models.build -> algorithms.make_learner) on a small mamlpp
    config: per-step BatchNorm, the fused path, one meta-step with finite gradients in every row used."""
    from fastmaml.algorithms.build import make_learner

    cfg = configs.apply_overrides(configs.get("mamlpp-omniglot-5w1s"), ["hidden=4", "inner_steps=2", "test_steps=2"])
    model = build(cfg)
    learner = make_learner(cfg, model)
    assert learner.execution_path.startswith("fused"), learner.execution_path
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(2, 5, 1, 28, 28, generator=g)
    sy = torch.arange(5).expand(2, -1).contiguous()
    learner.meta_step(sx, sy, sx.clone(), sy)
    for m in learner.model.modules():
        if isinstance(m, PerStepBatchNorm):
            assert m.weight.grad.shape == (2, 4) and torch.isfinite(m.weight.grad).all()
            assert (m.weight.grad.abs().sum(1) > 0).all()
    out = learner.evaluate(sx, sy, sx, sy, steps=cfg["test_steps"])
    assert torch.isfinite(out.task_losses).all()
