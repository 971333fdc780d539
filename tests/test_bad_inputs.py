"""The bad-input audit (issue 13, items 1-7): every case raises a clear error naming the argument,
and leaves the parameters and ``.grad`` exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastmaml
from helpers import classification_batch, conv_bn, mlp, regression_batch, same_state, state


def _expect(learner, exc, match, fn, *args, **kw):
    before = state(learner)
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    assert same_state(before, state(learner))


@pytest.fixture
def regressor():
    torch.manual_seed(0)
    lrn = fastmaml.MAML(mlp().double(), inner_lr=0.1, inner_steps=2, learn_lr=True)
    lrn.meta_step(*regression_batch(2))  # .grad already holds something: it must stay as is
    return lrn


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    lrn = fastmaml.MAML(conv_bn().double(), inner_lr=0.1, inner_steps=1)
    lrn.meta_step(*classification_batch(2))
    return lrn


# -- 1. targets of another shape than the predictions ------------------------------------------------

@pytest.mark.parametrize("shape", ["flat", "extra"])
def test_regression_targets_must_have_the_prediction_shape(regressor, shape):
    sx, sy, qx, qy = regression_batch(2)
    bad = qy[..., 0] if shape == "flat" else qy[..., None]
    got = r"\[2, 6\]" if shape == "flat" else r"\[2, 6, 1, 1\]"
    _expect(regressor, ValueError, rf"query_y .*shape {got}.*prediction.*\[2, 6, 1\]",
            regressor.meta_step, sx, sy, qx, bad)
    _expect(regressor, ValueError, r"support_y .*prediction.*\[2, 5, 1\]",
            regressor.meta_step, sx, sy[..., 0], qx, qy)


def test_float_labels_on_a_classifier_are_refused(classifier):
    sx, sy, qx, qy = classification_batch(2)
    _expect(classifier, ValueError, r"query_y .*float targets of shape \[2, 6\].*\[2, 6, 3\].*int64 labels",
            classifier.meta_step, sx, sy, qx, qy.double())


def test_int_labels_need_a_task_by_example_shape(classifier):
    sx, sy, qx, qy = classification_batch(2)
    _expect(classifier, ValueError, r"query_y: int64 class labels must have shape \[T, N\] = \[2, 6\].*got \[2, 6, 1\]",
            classifier.meta_step, sx, sy, qx, qy[..., None])


# -- 2. finite loss, non-finite meta-gradient --------------------------------------------------------

@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("learn_lr", [False, True])
def test_non_finite_meta_gradient_leaves_grad_untouched(learn_lr, batching):
    """inner_lr 1e21 in float32 on the autograd paths: every loss is finite, the second-order terms
    overflow. Per-element rates when they are not learned: with one scalar rate the engine computes
    a (H v) instead of H (a v) (docs/design.md), which stays finite here."""
    torch.manual_seed(0)
    lrn = fastmaml.MAML(conv_bn(), inner_lr=1e21, inner_steps=1, learn_lr=learn_lr, batching=batching,
                        lr_mode=None if learn_lr else "per_parameter")
    for p in lrn.parameters():
        p.grad = torch.randn_like(p)  # earlier gradients: they must stay as they are
    batch = classification_batch(2, dtype=torch.float32)
    _expect(lrn, FloatingPointError, r"non-finite meta-gradient: .* of 0\.weight .*unchanged", lrn.meta_step, *batch)


@pytest.mark.parametrize("where", ["adapted", "lr"])
def test_any_non_finite_meta_gradient_is_refused_whatever_the_path(where, monkeypatch):
    """Whatever computed it, a NaN in any gradient (the learnable rate's too) never reaches .grad."""
    torch.manual_seed(0)
    lrn = fastmaml.MAML(mlp().double(), inner_lr=0.1, inner_steps=2, learn_lr=True)
    lrn.meta_step(*regression_batch(2))
    real = type(lrn.engine).meta_gradient

    def poisoned(self, *a, **k):
        r = real(self, *a, **k)
        if where == "adapted":
            r.theta_grad = r.theta_grad.clone()
            r.theta_grad[3] = float("nan")
        else:
            r.lr_grad = torch.full_like(r.lr_grad, float("inf"))
        return r

    monkeypatch.setattr(type(lrn.engine), "meta_gradient", poisoned)
    name = r"0\.weight" if where == "adapted" else r"inner_lr\.lr"
    _expect(lrn, FloatingPointError, rf"non-finite meta-gradient: .* of {name} ", lrn.meta_step, *regression_batch(2))


# -- 3. tied modules and parameters -------------------------------------------------------------------

class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 4)
        self.b = nn.Linear(4, 1)
        self.b_again = self.b

    def forward(self, x):
        return self.b_again(torch.tanh(self.a(x)))


class _TiedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_module_registered_twice_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"'b' and 'b_again'"):
        fastmaml.MAML(_Tied())


def test_a_tied_parameter_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"'a.weight' and 'b.weight'"):
        fastmaml.MAML(_TiedWeight())


# -- 4. randomness in the model -----------------------------------------------------------------------

def _dropout_mlp():
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)).double()


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_dropout_in_training_mode_is_refused(batching):
    torch.manual_seed(0)
    lrn = fastmaml.MAML(_dropout_mlp(), inner_lr=0.1, inner_steps=2, batching=batching)
    batch = regression_batch(2)
    _expect(lrn, ValueError, r"meta_step: model\.2 \(Dropout, p=0\.3\) is in training mode and draws random numbers", lrn.meta_step, *batch)
    _expect(lrn, ValueError, r"adapt: model\.2 \(Dropout, p=0\.3\)", lrn.adapt, batch[0], batch[1])
    lrn.eval()  # in evaluation mode dropout is the identity: allowed
    lrn.meta_step(*batch)
    lrn.adapt(batch[0], batch[1])


# -- 5. inner_lr and inner_steps ------------------------------------------------------------------------

@pytest.mark.parametrize("lr", [0.1, 1, [0.1, 0.2], (0.1, 0.2), torch.tensor(0.1), torch.tensor([0.1, 0.2]),
                                np.float32(0.1), np.float64(0.1), np.int64(1), [np.float32(0.1), torch.tensor(0.2)]])
def test_inner_lr_accepts_numbers_sequences_tensors_and_numpy_scalars(lr):
    lrn = fastmaml.MAML(mlp().double(), inner_lr=lr, inner_steps=2)
    lrn.meta_step(*regression_batch(2))
    assert torch.isfinite(lrn.inner_lr.lr).all()


@pytest.mark.parametrize("lr,match", [
    ("0.1", r"inner_lr must be .*got a str '0.1'"),
    (True, r"inner_lr must be .*got a bool"),
    (-0.1, r"inner_lr must be >= 0, got -0.1"),
    ([0.1, -0.2], r"inner_lr must be >= 0, got -0.2"),
    (float("nan"), r"inner_lr must be finite, got nan"),
    (float("inf"), r"inner_lr must be finite, got inf"),
    (torch.ones(2, 2), r"inner_lr .*0-d or 1-d.*\[2, 2\]"),
    (None, r"inner_lr must be .*got NoneType"),
    ([], r"inner_lr .*empty"),
    (["a", "b"], r"inner_lr must be .*got a str 'a'"),
])
def test_inner_lr_rejects_the_rest_clearly(lr, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fastmaml.MAML(mlp(), inner_lr=lr, inner_steps=2)


@pytest.mark.parametrize("steps", [True, False, 1.0, "2", 0, -1])
def test_inner_steps_must_be_a_real_int(steps):
    with pytest.raises((TypeError, ValueError), match=r"inner_steps must be an int >= 1"):
        fastmaml.MAML(mlp(), inner_steps=steps)


def test_inner_steps_accepts_a_numpy_int():
    assert fastmaml.MAML(mlp(), inner_steps=np.int64(2)).inner_steps == 2


def test_steps_argument_refuses_a_bool(regressor):
    _expect(regressor, (TypeError, ValueError), r"steps must be an int", regressor.meta_step,
            *regression_batch(2), steps=True)


# -- 6. predict -------------------------------------------------------------------------------------------

@pytest.fixture
def adapted(classifier):
    sx, sy, qx, qy = classification_batch(2)
    return classifier, classifier.adapt(sx, sy), qx


def test_predict_refuses_nan_inputs(adapted):
    lrn, fast, qx = adapted
    bad = qx.clone()
    bad[1, 2, 0, 3, 3] = float("nan")
    _expect(lrn, ValueError, r"x holds a non-finite value \(nan\) in task 1, example 2", lrn.predict, fast, bad)


def test_predict_refuses_another_image_size(adapted):
    lrn, fast, qx = adapted
    _expect(lrn, ValueError, r"x has examples of shape \[1, 16, 16\] but the support set's are \[1, 8, 8\]",
            lrn.predict, fast, torch.randn(2, 6, 1, 16, 16, dtype=torch.float64))
    _expect(lrn, ValueError, r"x has examples of shape \[3, 8, 8\]",
            lrn.predict, fast, torch.randn(2, 6, 3, 8, 8, dtype=torch.float64))


def test_predict_refuses_another_dtype_and_non_tensors(adapted):
    lrn, fast, qx = adapted
    _expect(lrn, TypeError, r"x has dtype torch.float32 but the model's parameters are torch.float64",
            lrn.predict, fast, qx.float())
    _expect(lrn, TypeError, r"x must be a floating-point tensor", lrn.predict, fast, qx.long())
    _expect(lrn, TypeError, r"x must be a Tensor, got list", lrn.predict, fast, [1, 2])


def test_predict_refuses_another_device(adapted):
    lrn, fast, qx = adapted
    _expect(lrn, ValueError, r"x is on meta but the model is on cpu", lrn.predict, fast, qx.to("meta"))


def test_predict_refuses_a_raw_tensor(adapted):
    lrn, fast, qx = adapted
    _expect(lrn, TypeError, r"fast must be the FastWeights .*adapt\(\).*got a Tensor.*fast\.flat",
            lrn.predict, fast.flat, qx)


def test_predict_refuses_fast_weights_of_another_learner(adapted):
    lrn, fast, qx = adapted
    other = fastmaml.MAML(mlp().double())
    ofast = other.adapt(*regression_batch(2)[:2])
    _expect(lrn, ValueError, r"fast.*another learner", lrn.predict, ofast, qx)
    same_layout = fastmaml.MAML(conv_bn().double())
    sfast = same_layout.adapt(*classification_batch(2)[:2])
    _expect(lrn, ValueError, r"fast.*another learner", lrn.predict, sfast, qx)


def test_predict_refuses_a_task_count_mismatch(adapted):
    lrn, fast, qx = adapted
    _expect(lrn, ValueError, r"x has 1 tasks .* fast holds 2", lrn.predict, fast, qx[:1])


def test_predict_still_works(adapted):
    lrn, fast, qx = adapted
    assert lrn.predict(fast, qx).shape == (2, 6, 3)


# -- 7. the query set's inputs ------------------------------------------------------------------------------

def test_query_inputs_of_another_shape_than_the_support(classifier):
    sx, sy, qx, qy = classification_batch(2)
    _expect(classifier, ValueError, r"query_x has examples of shape \[1, 16, 16\] but support_x's are \[1, 8, 8\]",
            classifier.meta_step, sx, sy, torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), qy)
    _expect(classifier, ValueError, r"query_x has examples of shape \[3, 8, 8\] but support_x's are \[1, 8, 8\]",
            classifier.meta_step, sx, sy, torch.randn(2, 6, 3, 8, 8, dtype=torch.float64), qy)
    _expect(classifier, ValueError, r"query_x has examples of shape",
            classifier.evaluate, sx, sy, torch.randn(2, 6, 3, 8, 8, dtype=torch.float64), qy)


def test_nan_inputs_are_refused_in_meta_step(classifier):
    sx, sy, qx, qy = classification_batch(2)
    bad = qx.clone()
    bad[0, 1, 0, 0, 0] = float("inf")
    _expect(classifier, ValueError, r"query_x holds a non-finite value \(inf\) in task 0, example 1",
            classifier.meta_step, sx, sy, bad, qy)


def test_adapt_given_as_a_generator_adapts_what_the_list_adapts():
    """``adapt`` is read twice in MAML's constructor (the layout and the would-be-adapted set that
    ``_check_model`` compares with): a generator is normalized to a tuple once, so both see it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    names = ["2.weight", "2.bias"]
    listed = fastmaml.MAML(model, adapt=names)
    generated = fastmaml.MAML(model, adapt=(n for n in names))
    assert generated.adapted_names == listed.adapted_names == tuple(names)
    assert generated._adapt_candidates == listed._adapt_candidates == frozenset(names)
