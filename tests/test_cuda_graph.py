"""MAML(cuda_graph=True): the captured meta-step against the eager engine, and its argument checks.

The comparisons need a CUDA device (they run in bench/gpu_check.sh); the argument checks run anywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastmaml
from helpers import classification_batch, conv_bn, grads_of, mlp, regression_batch, rel_err, same_state, state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_arguments():
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        fastmaml.MAML(mlp(), cuda_graph=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs backend='engine'"):
        fastmaml.MAML(mlp(), backend="reference", cuda_graph=True)


def test_cpu_model_is_refused_and_nothing_changes():
    learner = fastmaml.MAML(mlp().double(), cuda_graph=True)
    before = state(learner)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model and the inputs on a CUDA device"):
        learner.meta_step(*regression_batch(3))
    assert same_state(before, state(learner))


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


@cuda
@pytest.mark.parametrize("case", ["mlp", "conv_bn", "conv_bn_learned_lr", "mlp_K3_multistep", "conv_bn_first_order"])
def test_graph_matches_eager_over_several_steps(case):
    """Three meta-steps with fresh inputs and an optimizer step between them: the replayed graph
    must follow the parameters as they change, and read new inputs each time."""
    torch.manual_seed(0)
    if case.startswith("mlp"):
        model, make = mlp().double(), (lambda s: regression_batch(4, seed=s))
    else:
        model, make = conv_bn().double(), (lambda s: classification_batch(4, seed=s))
    kw = dict(inner_lr=0.1, adapt_bn=True)
    if case == "conv_bn_learned_lr":
        kw.update(inner_lr=[0.1, 0.2], inner_steps=2, lr_mode="per_layer_per_step", learn_lr=True)
    if case == "mlp_K3_multistep":
        kw.update(inner_steps=3, multi_step_weights=[0.2, 0.3, 0.5])
    if case == "conv_bn_first_order":
        kw.update(first_order=True, inner_steps=2)
    eager = fastmaml.MAML(copy.deepcopy(model).cuda(), **kw)
    graphed = fastmaml.MAML(copy.deepcopy(model).cuda(), cuda_graph=True, **kw)
    graphed.inner_lr.lr.data.copy_(eager.inner_lr.lr.data)
    if case.startswith("conv"):  # the conv nets run on the fused path, in the graph too
        assert graphed.execution_path.startswith("fused"), graphed.execution_path
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    outs = []
    for step in range(3):
        batch = _to(make(step), "cuda")
        for opt in opts:
            opt.zero_grad()
        a = eager.meta_step(*batch)
        b = graphed.meta_step(*batch)
        outs.append((b.loss, b.loss.clone()))
        assert rel_err(grads_of(graphed), grads_of(eager)) <= 1e-10
        assert torch.allclose(b.task_losses, a.task_losses, rtol=1e-10, atol=0)
        for opt in opts:
            opt.step()
    # What a step returned is the caller's: later replays do not overwrite it.
    for held, copy_at_the_time in outs:
        assert torch.equal(held, copy_at_the_time)


@cuda
def test_new_shape_records_a_new_graph():
    model = mlp().double().cuda()
    eager = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1)
    graphed = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1, cuda_graph=True)
    for T in (3, 5, 3):
        batch = _to(regression_batch(T, seed=T), "cuda")
        for m in (eager, graphed):
            m.zero_grad()
            m.meta_step(*batch)
        assert graphed._graphed.static_inputs[0].shape[0] == T
        assert rel_err(grads_of(graphed), grads_of(eager)) <= 1e-10


@cuda
def test_replaced_parameter_records_a_new_graph():
    model = mlp().double().cuda()
    graphed = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1, cuda_graph=True)
    batch = _to(regression_batch(3), "cuda")
    graphed.meta_step(*batch)
    first = graphed._graphed
    with torch.no_grad():
        graphed.model[0].weight.data = graphed.model[0].weight.data * 2.0  # a new tensor, a new address
        model[0].weight.mul_(2.0)
    graphed.zero_grad()
    graphed.meta_step(*batch)
    assert graphed._graphed is not first
    eager = fastmaml.MAML(model, inner_lr=0.1)
    eager.meta_step(*batch)
    assert rel_err(grads_of(graphed), grads_of(eager)) <= 1e-10


@cuda
def test_nan_is_reported_and_nothing_changes():
    learner = fastmaml.MAML(mlp().double().cuda(), inner_lr=0.1, cuda_graph=True)
    sx, sy, qx, qy = _to(regression_batch(3), "cuda")
    learner.meta_step(sx, sy, qx, qy)
    before = state(learner)
    sy = sy.clone()
    sy[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="task 1"):
        learner.meta_step(sx, sy, qx, qy)
    assert same_state(before, state(learner))
