"""``MAML(bn_stats="running")``: BatchNorm running statistics (issue 11, item 6).

(a) against learn2learn 0.2 itself, where it imports (the bench venv); (b) against an oracle written
here: a plain float64 per-task loop over ``torch.nn.functional`` (conv2d, batch_norm, linear) whose
BatchNorm buffers are updated explicitly, one forward after the other; it shares no code with fastmaml;
(c) evaluation mode normalizes with the running statistics and reports the generic path; (d) errors.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmaml

TOL_GRAD = 1e-10
TOL_BUF = 1e-12
BN_KEYS = ("1", "5")
ADAPTED = ("0.weight", "0.bias", "4.weight", "4.bias", "9.weight", "9.bias")


def net(momentum: Optional[float] = 0.1, track: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum, track_running_stats=track), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum, track_running_stats=track), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():  # BatchNorm's affine parameters away from 1 / 0, buffers away from 0 / 1
        for k in BN_KEYS:
            m[int(k)].weight.uniform_(0.5, 1.5)
            m[int(k)].bias.uniform_(-0.5, 0.5)
            if track:
                m[int(k)].running_mean.uniform_(-0.3, 0.3)
                m[int(k)].running_var.uniform_(0.5, 2.0)
                m[int(k)].num_batches_tracked.fill_(3)
    return m


def batch(T: int = 4, seed: int = 0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=torch.float64) * 1.5 + shift
    qx = torch.randn(T, 9, 1, 8, 8, generator=g, dtype=torch.float64) * 1.5 + shift
    sy = torch.arange(3).repeat(2).expand(T, -1).contiguous()
    qy = torch.arange(3).repeat(3).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def rel(a: List[Tensor], b: List[Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-300)


# -- the oracle: a per-task loop over torch.nn.functional, buffers updated by hand -----------------
class Oracle:
    """The network of ``net()`` as functions of a parameter dict, with its own BatchNorm buffers."""

    def __init__(self, model: nn.Module, momentum: Optional[float]):
        self.momentum = momentum
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        self.buf = {k: {"mean": model[int(k)].running_mean.clone(), "var": model[int(k)].running_var.clone(),
                        "n": int(model[int(k)].num_batches_tracked)} for k in BN_KEYS}

    def bn(self, h: Tensor, key: str, p: Dict[str, Tensor], training: bool) -> Tensor:
        w, b = p[key + ".weight"], p[key + ".bias"]
        if not training:
            return F.batch_norm(h, self.buf[key]["mean"], self.buf[key]["var"], w, b, training=False, eps=1e-5)
        mean = h.detach().mean((0, 2, 3))
        var = h.detach().var((0, 2, 3), unbiased=True)
        st = self.buf[key]
        st["n"] += 1
        f = self.momentum if self.momentum is not None else 1.0 / st["n"]
        st["mean"] = (1 - f) * st["mean"] + f * mean
        st["var"] = (1 - f) * st["var"] + f * var
        return F.batch_norm(h, None, None, w, b, training=True, eps=1e-5)

    def forward(self, p: Dict[str, Tensor], x: Tensor, training: bool = True) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn(F.conv2d(x, p["0.weight"], p["0.bias"], padding=1), "1", p, training)), 2)
        h = F.max_pool2d(F.relu(self.bn(F.conv2d(h, p["4.weight"], p["4.bias"], padding=1), "5", p, training)), 2)
        return F.linear(h.flatten(1), p["9.weight"], p["9.bias"])

    def inner(self, x, y, steps, lr, first_order, training, adapted=ADAPTED, query=None, weights=None):
        """One task's inner loop from the parameters; query losses (weighted) along the way."""
        fast = dict(self.params)
        total = 0.0
        for k in range(steps):
            loss = F.cross_entropy(self.forward(fast, x, training), y)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=not first_order)
            for n, g in zip(adapted, grads):
                fast[n] = fast[n] - lr * (g.detach() if first_order else g)
            w = 1.0 if weights is None and k == steps - 1 else (0.0 if weights is None else weights[k])
            if query is not None and w != 0.0:
                total = total + w * F.cross_entropy(self.forward(fast, query[0], training), query[1])
        return fast, total

    def meta_step(self, data, steps, lr, first_order, training=True, adapted=ADAPTED, weights=None):
        sx, sy, qx, qy = data
        T = sx.shape[0]
        total = 0.0
        for t in range(T):
            _, q = self.inner(sx[t], sy[t], steps, lr, first_order, training, adapted, (qx[t], qy[t]), weights)
            total = total + q
        grads = torch.autograd.grad(total / T, list(self.params.values()))
        return dict(zip(self.params, grads))

    def sgd(self, grads, lr):
        with torch.no_grad():
            self.params = {n: (p - lr * grads[n]).requires_grad_(True) for n, p in self.params.items()}


def buffers_of(model: nn.Module) -> List[Tensor]:
    return [t for k in BN_KEYS for t in (model[int(k)].running_mean, model[int(k)].running_var)]


def oracle_buffers(o: Oracle) -> List[Tensor]:
    return [o.buf[k][s] for k in BN_KEYS for s in ("mean", "var")]


def check_buffers(model: nn.Module, o: Oracle) -> None:
    assert rel(buffers_of(model), oracle_buffers(o)) <= TOL_BUF
    for k in BN_KEYS:
        assert int(model[int(k)].num_batches_tracked) == o.buf[k]["n"]


def sgd(learner: fastmaml.MAML, lr: float) -> None:
    with torch.no_grad():
        for p in learner.model.parameters():
            p -= lr * p.grad
            p.grad = None


PATHS = {  # name: MAML keywords
    "fused-store": dict(batching="auto", memory="store"),
    "fused-recompute": dict(batching="auto", memory="recompute"),
    "loop-store": dict(batching="loop", memory="store"),
    "vmap-recompute": dict(batching="vmap", memory="recompute"),
}


# -- (b) training mode against the oracle ---------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("path", list(PATHS))
def test_meta_step_updates_running_stats_like_the_per_task_loop(momentum, steps, first_order, path):
    model = net(momentum)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=steps, first_order=first_order, bn_stats="running",
                            **PATHS[path])
    assert learner.execution_path.startswith("fused" if path.startswith("fused") else "generic")
    o = Oracle(model, momentum)
    for it in range(2):  # two meta-steps with an SGD step between: the buffers carry over
        data = batch(seed=it, shift=0.3 * it)
        learner.meta_step(*data)
        want = o.meta_step(data, steps, 0.3, first_order)
        got = {n: p.grad for n, p in model.named_parameters()}
        assert rel([got[n] for n in want], list(want.values())) <= TOL_GRAD
        check_buffers(model, o)
        sgd(learner, 0.1)
        o.sgd(want, 0.1)


def test_running_mode_leaves_the_meta_gradient_unchanged():
    data = batch()
    grads = {}
    for mode in ("batch", "running"):
        model = net()
        learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats=mode)
        learner.meta_step(*data)
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        if mode == "batch":  # bn_stats="batch" touches no buffer
            assert int(model[1].num_batches_tracked) == 3
    assert all(torch.equal(a, b) for a, b in zip(grads["batch"], grads["running"]))


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_multi_step_loss_chunks_and_reference_backend(backend):
    """Order S0, Q1, S1, Q2 with multi-step weights; task chunks keep the task order."""
    model = net(0.2)
    weights = [0.4, 1.0]
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, multi_step_weights=weights, task_chunk=2,
                            backend=backend, bn_stats="running")
    o = Oracle(model, 0.2)
    data = batch(T=5)
    learner.meta_step(*data)
    want = o.meta_step(data, 2, 0.3, False, weights=weights)
    got = {n: p.grad for n, p in model.named_parameters()}
    assert rel([got[n] for n in want], list(want.values())) <= TOL_GRAD
    check_buffers(model, o)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_adapt_predict_evaluate_in_training_mode(momentum):
    """adapt: the support forwards, task after task; predict: the query forward per task; evaluate:
    per task support then query (meta_step's order)."""
    data = batch(T=3)
    sx, sy, qx, qy = data
    model = net(momentum)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats="running")
    o = Oracle(model, momentum)
    fast = learner.adapt(sx, sy)
    fasts = [o.inner(sx[t], sy[t], 2, 0.3, True, True)[0] for t in range(3)]
    check_buffers(model, o)
    pred = learner.predict(fast, qx)
    want = torch.stack([o.forward(fasts[t], qx[t]) for t in range(3)])
    assert rel([pred], [want.detach()]) <= 1e-12
    check_buffers(model, o)

    model = net(momentum)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats="running")
    o = Oracle(model, momentum)
    out = learner.evaluate(*data)
    for t in range(3):
        f, _ = o.inner(sx[t], sy[t], 2, 0.3, True, True)
        o.forward(f, qx[t])
    check_buffers(model, o)
    assert out.task_losses.shape == (3,)


def test_differentiable_adapt_in_training_mode():
    """adapt(create_graph=True) + learner(fast, qx) + backward: the meta-gradient of the mean query
    loss, and the buffers updated by the support forwards (task-major) and then the query forward."""
    data = batch(T=3)
    sx, sy, qx, qy = data
    model = net(0.1)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats="running", memory="recompute")
    o = Oracle(model, 0.1)
    fast = learner.adapt(sx, sy, create_graph=True)
    out = learner(fast, qx)
    F.cross_entropy(out.flatten(0, 1), qy.flatten()).backward()
    fasts = [o.inner(sx[t], sy[t], 2, 0.3, False, True)[0] for t in range(3)]
    total = sum(F.cross_entropy(o.forward(fasts[t], qx[t]), qy[t]) for t in range(3)) / 3
    want = dict(zip(o.params, torch.autograd.grad(total, list(o.params.values()))))
    got = {n: p.grad for n, p in model.named_parameters()}
    assert rel([got[n] for n in want], list(want.values())) <= TOL_GRAD
    check_buffers(model, o)


# -- (c) evaluation mode --------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["auto", "vmap"])
def test_eval_mode_uses_running_statistics(batching):
    data = batch(T=3, seed=5)
    sx, sy, qx, qy = data
    model = net(0.1)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats="running", batching=batching)
    learner.meta_step(*batch(T=3, seed=6))  # some training first
    for p in model.parameters():
        p.grad = None
    o = Oracle(model, 0.1)
    before = [b.clone() for b in buffers_of(model)]
    learner.eval()
    path = learner.execution_path
    assert path.startswith("generic") and "BatchNorm in eval mode with bn_stats='running'" in path
    assert "model.1" in path and "model.5" in path
    fast = learner.adapt(sx, sy)
    pred = learner.predict(fast, qx)
    want = []
    for t in range(3):
        f, _ = o.inner(sx[t], sy[t], 2, 0.3, True, training=False)
        want.append(o.forward(f, qx[t], training=False).detach())
    assert rel([pred], [torch.stack(want)]) <= 1e-12
    # a batch statistic would differ: the predictions are not the training-mode ones
    o2 = Oracle(model, 0.1)
    assert rel([pred], [torch.stack([o2.forward(o2.inner(sx[t], sy[t], 2, 0.3, True, True)[0], qx[t])
                                     for t in range(3)]).detach()]) > 1e-3
    out = learner.evaluate(*data)
    assert torch.allclose(out.task_losses, F.cross_entropy(torch.stack(want).flatten(0, 1), qy.flatten(),
                                                           reduction="none").view(3, -1).mean(1), atol=1e-12)
    # the meta-gradient in evaluation mode: BatchNorm as a fixed affine map (running statistics)
    learner.meta_step(*data)
    wantg = o.meta_step(data, 2, 0.3, False, training=False)
    got = {n: p.grad for n, p in model.named_parameters()}
    assert rel([got[n] for n in wantg], list(wantg.values())) <= TOL_GRAD
    assert all(torch.equal(a, b) for a, b in zip(before, buffers_of(model)))  # nothing updated in eval mode
    learner.train()
    assert learner.execution_path.startswith("fused" if batching == "auto" else "generic (vmap): batching")


def test_batch_mode_ignores_eval():
    """bn_stats='batch' (default): batch statistics in eval mode too, the fused path stays."""
    model = net(0.1)
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=1)
    learner.eval()
    assert learner.execution_path.startswith("fused")
    sx, sy, qx, qy = batch(T=2)
    pred = learner.predict(learner.adapt(sx, sy), qx)
    o = Oracle(model, 0.1)
    want = torch.stack([o.forward(o.inner(sx[t], sy[t], 1, 0.3, True, True)[0], qx[t]) for t in range(2)])
    assert rel([pred], [want.detach()]) <= 1e-12
    assert int(model[1].num_batches_tracked) == 3


# -- (d) errors -----------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match=r"bn_stats must be one of 'batch', 'running', got 'runing'"):
        fastmaml.MAML(net(), bn_stats="runing")
    with pytest.raises(ValueError, match=r"model\.1 \(BatchNorm2d\(4\)\) has track_running_stats=False"):
        fastmaml.MAML(net(track=False), bn_stats="running")
    fastmaml.MAML(net(track=False))  # fine with batch statistics
    with pytest.raises(ValueError, match="cuda_graph=True with bn_stats='running'"):
        fastmaml.MAML(net(), bn_stats="running", cuda_graph=True)
    model = net()
    learner = fastmaml.MAML(model, backend="reference", bn_stats="running")
    learner.eval()
    with pytest.raises(ValueError, match=r"meta_step: backend='reference' runs per-task batch statistics.*model\.1"):
        learner.meta_step(*batch(T=2))
    learner = fastmaml.MAML(net(), bn_stats="running")  # changed after construction: refused at the call
    learner.model[5].track_running_stats = False
    with pytest.raises(ValueError, match=r"model\.5 .*track_running_stats=False"):
        learner.meta_step(*batch(T=2))


def test_a_refused_call_changes_no_buffer():
    model = net()
    learner = fastmaml.MAML(model, inner_lr=0.3, inner_steps=2, bn_stats="running")
    before = [b.clone() for b in buffers_of(model)] + [model[1].num_batches_tracked.clone()]
    with pytest.raises(FloatingPointError, match="non-finite support"):  # found after the inner loop ran
        learner.meta_step(*batch(T=2), loss_fn=lambda pred, y: F.cross_entropy(pred, y) / 0.0)
    after = buffers_of(model) + [model[1].num_batches_tracked]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# -- (a) learn2learn 0.2 itself ---------------------------------------------------------------------
def _import_l2l():
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
        from baselines import import_learn2learn
        return import_learn2learn(), ""
    except Exception as e:  # noqa: BLE001
        return None, (f"learn2learn is not importable here ({type(e).__name__}: {e}); run this file with the "
                      "bench venv (.venv-bench, bench/setup_bench_env.sh)")
    finally:
        sys.path.pop(0)


L2L, WHY = _import_l2l()


@pytest.mark.skipif(L2L is None, reason=WHY or "learn2learn missing")
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("first_order", [False, True])
def test_same_running_statistics_as_learn2learn(momentum, first_order):
    """learn2learn's loop (per task: clone, K adapts on the support set, query loss; mean; backward)
    with adapt_bn=True (learn2learn adapts every parameter), three meta-steps with SGD between."""
    steps = 2
    ours_model, theirs_model = net(momentum), net(momentum)
    learner = fastmaml.MAML(ours_model, inner_lr=0.3, inner_steps=steps, first_order=first_order, adapt_bn=True,
                            bn_stats="running")
    maml = L2L.algorithms.MAML(theirs_model, lr=0.3, first_order=first_order)
    for it in range(3):
        sx, sy, qx, qy = batch(seed=10 + it, shift=0.2 * it)
        learner.meta_step(sx, sy, qx, qy)
        total = 0.0
        for t in range(sx.shape[0]):
            clone = maml.clone()
            for _ in range(steps):
                clone.adapt(F.cross_entropy(clone(sx[t]), sy[t]))
            total = total + F.cross_entropy(clone(qx[t]), qy[t])
        (total / sx.shape[0]).backward()
        got = [p.grad for p in ours_model.parameters()]
        want = [p.grad for p in theirs_model.parameters()]
        assert rel(got, want) <= TOL_GRAD
        assert rel(buffers_of(ours_model), buffers_of(theirs_model)) <= TOL_BUF
        for k in BN_KEYS:
            assert int(ours_model[int(k)].num_batches_tracked) == int(theirs_model[int(k)].num_batches_tracked)
        for m in (ours_model, theirs_model):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None


def test_batchnorm1d_mlp_same_on_every_path():
    """BatchNorm1d ([N, C] inputs) on the fused path, vmap and the loop: the same running buffers."""
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.randn(4, 6, 5, generator=g, dtype=torch.float64), torch.randn(4, 9, 5, generator=g,
                                                                                   dtype=torch.float64)
    sy, qy = batch(T=4)[1], batch(T=4)[3]
    out = {}
    for batching in ("auto", "vmap", "loop"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3)).double()
        learner = fastmaml.MAML(model, inner_lr=0.2, inner_steps=2, bn_stats="running", batching=batching)
        assert learner.execution_path.startswith("fused" if batching == "auto" else "generic")
        learner.meta_step(sx, sy, qx, qy)
        out[batching] = [model[1].running_mean.clone(), model[1].running_var.clone()]
        assert int(model[1].num_batches_tracked) == 4 * 3
    assert rel(out["auto"], out["loop"]) <= TOL_BUF and rel(out["vmap"], out["loop"]) <= TOL_BUF
    # the loop's buffers against a hand-written per-task loop (momentum None: the mean of all 12 batches)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3)).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    adapted = ["0.weight", "0.bias", "3.weight", "3.bias"]
    means, variances = [], []

    def fwd(p, x):
        h = F.linear(x, p["0.weight"], p["0.bias"])
        means.append(h.detach().mean(0))
        variances.append(h.detach().var(0, unbiased=True))
        h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True)
        return F.linear(F.relu(h), p["3.weight"], p["3.bias"])

    for t in range(4):
        fast = dict(params)
        for _ in range(2):
            grads = torch.autograd.grad(F.cross_entropy(fwd(fast, sx[t]), sy[t]), [fast[n] for n in adapted])
            fast.update({n: fast[n] - 0.2 * g for n, g in zip(adapted, grads)})
        fwd(fast, qx[t])
    want = [torch.stack(means).mean(0), torch.stack(variances).mean(0)]  # num_batches_tracked was 0
    assert rel(out["loop"], want) <= TOL_BUF
