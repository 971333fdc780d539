"""Bad input to MAML: a clear error, and the model's parameters and .grad exactly as they were."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from helpers import classification_batch, conv_bn, mlp, regression_batch, same_state, state


@pytest.fixture
def learner():
    torch.manual_seed(0)
    lrn = fastmaml.MAML(conv_bn().double(), inner_lr=0.1, inner_steps=2, learn_lr=True)
    lrn.meta_step(*classification_batch(2))  # .grad already holds something: it must stay as is
    return lrn


def _expect(learner, exc, match, *batch, **kw):
    before = state(learner)
    with pytest.raises(exc, match=match):
        learner.meta_step(*batch, **kw)
    assert same_state(before, state(learner))


def test_task_count_mismatch(learner):
    sx, sy, qx, qy = classification_batch(3)
    _expect(learner, ValueError, r"query_x has 2 tasks", sx, sy, qx[:2], qy[:2])
    _expect(learner, ValueError, r"support_y has 2 tasks", sx, sy[:2], qx, qy)


def test_feature_shape_the_model_rejects(learner):
    sx, sy, qx, qy = classification_batch(2, size=8)
    bad = torch.randn(2, sx.shape[1], 3, 8, 8, dtype=torch.float64)
    bad_q = torch.randn(2, qx.shape[1], 3, 8, 8, dtype=torch.float64)
    _expect(learner, ValueError, r"the model rejected inputs of shape \[6, 3, 8, 8\]", bad, sy, bad_q, qy)


def test_labels_out_of_range(learner):
    sx, sy, qx, qy = classification_batch(2)
    qy = qy.clone()
    qy[1, 0] = 7
    _expect(learner, ValueError, r"query_y holds labels in \[0, 7\] but the model outputs 3 classes", sx, sy, qx, qy)
    sy = sy.clone()
    sy[0, 0] = -1
    _expect(learner, ValueError, r"support_y holds labels in \[-1, 2\]", sx, sy, qx, qy)


def test_integer_inputs(learner):
    sx, sy, qx, qy = classification_batch(2)
    _expect(learner, TypeError, r"support_x must be a floating-point tensor", sx.long(), sy, qx, qy)
    _expect(learner, TypeError, r"query_y must hold int64 class labels or float targets", sx, sy, qx, qy.int())


def test_empty_support_set(learner):
    sx, sy, qx, qy = classification_batch(2)
    _expect(learner, ValueError, r"support_x is empty", sx[:, :0], sy[:, :0], qx, qy)


def test_dtype_mismatch(learner):
    sx, sy, qx, qy = classification_batch(2)
    _expect(learner, TypeError, r"support_x has dtype torch.float32 but the model's parameters are torch.float64",
            sx.float(), sy, qx, qy)


def test_label_count_mismatch(learner):
    sx, sy, qx, qy = classification_batch(2)
    _expect(learner, ValueError, r"support_y must have one target per example", sx, sy[:, :-1], qx, qy)


@pytest.mark.parametrize("where", ["support", "query"])
def test_nan_loss_names_step_and_task(where):
    torch.manual_seed(1)
    learner = fastmaml.MAML(mlp().double(), inner_lr=0.1, inner_steps=3, multi_step_weights=[0.2, 0.3, 1.0])
    sx, sy, qx, qy = regression_batch(3)
    if where == "support":
        sy = sy.clone()
        sy[2, 1, 0] = float("nan")
        match = r"non-finite support \(inner\) loss nan at inner step 0 of task 2"
    else:
        qy = qy.clone()
        qy[1, 0, 0] = float("inf")
        match = r"non-finite query loss inf after inner step 1 of task 1"
    _expect(learner, FloatingPointError, match, sx, sy, qx, qy)


def test_steps_beyond_per_step_rates():
    learner = fastmaml.MAML(mlp().double(), inner_lr=[0.1, 0.2], inner_steps=2)
    with pytest.raises(ValueError, match=r"steps=3 exceeds the 2 per-step learning rates"):
        learner.meta_step(*regression_batch(2), steps=3)


def test_constructor_arguments():
    m = mlp()
    with pytest.raises(ValueError, match=r"inner_lr has 3 values but inner_steps=2"):
        fastmaml.MAML(m, inner_lr=[0.1, 0.1, 0.1], inner_steps=2)
    with pytest.raises(ValueError, match=r"lr_mode must be one of"):
        fastmaml.MAML(m, lr_mode="per_layer")
    with pytest.raises(ValueError, match=r"memory must be one of store, recompute"):
        fastmaml.MAML(m, memory="checkpoint")
    with pytest.raises(ValueError, match=r"backend must be one of engine, reference"):
        fastmaml.MAML(m, backend="fast")
    with pytest.raises(ValueError, match=r"adapt names unknown or frozen parameters \['nope'\]"):
        fastmaml.MAML(m, adapt=["nope"])
    with pytest.raises(ValueError, match=r"multi_step_weights must have inner_steps=2 entries"):
        fastmaml.MAML(m, inner_steps=2, multi_step_weights=[1.0])
    with pytest.raises(ValueError, match=r"adapt selects no parameter"):
        fastmaml.MAML(m, adapt=lambda n, p: False)
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        fastmaml.MAML(lambda x: x)
