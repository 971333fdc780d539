"""MAML++ (Antoniou et al. 2019) schedules: the multi-step loss annealing against the MAML++ code's
formula written out here, cosine annealing, derivative-order annealing (first-order meta-gradients,
then second-order ones, each against the per-task reference), and bad settings."""

import math
import os

import pytest
import torch

from fastmaml import MAML, MAMLPPSchedule
from fastmaml.app import configs
from fastmaml.algorithms.mamlpp import EPOCH, cosine_lr, msl_weights
from fastmaml.app.errors import UserError
from fastmaml.reference import maml as reference
from helpers import classification_batch, conv_bn


def _msl_by_hand(K, epoch, msl_epochs):
    # get_per_step_loss_importance_vector of the MAML++ code, in plain Python
    w = [1.0 / K] * K
    decay = 1.0 / K / msl_epochs
    lo = 0.03 / K
    for i in range(K - 1):
        w[i] = max(w[i] - epoch * decay, lo)
    w[-1] = min(w[-1] + epoch * (K - 1) * decay, 1.0 - (K - 1) * lo)
    return w


@pytest.mark.parametrize("K,epoch,n", [(5, 0, 10), (5, 3, 10), (5, 9, 10), (5, 40, 10), (3, 1, 2)])
def test_msl_weights(K, epoch, n):
    assert msl_weights(K, epoch, n) == pytest.approx(_msl_by_hand(K, epoch, n), abs=1e-15)


def test_cosine_and_schedule_switches():
    s = MAMLPPSchedule(iterations=3000, first_order_iterations=1000, msl_iterations=2 * EPOCH, meta_lr=1e-3,
                       min_meta_lr=1e-5)
    assert s.lr(1) == pytest.approx(1e-3) and s.lr(3000) == pytest.approx(1e-5)
    assert s.lr(1500) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 1499 / 2999)))
    assert cosine_lr(7, 1, 0.5, 0.1) == 0.5
    assert s.first_order(1) and s.first_order(1000) and not s.first_order(1001)
    assert s.weights(1, 5) == pytest.approx([0.2] * 5)
    assert s.weights(EPOCH + 1, 5) == pytest.approx(_msl_by_hand(5, 1, 2))
    assert s.weights(2 * EPOCH + 1, 5) is None  # after the annealing: the last step's loss only


def test_derivative_order_annealing_meta_gradients():
    torch.manual_seed(0)
    model = conv_bn().double()
    sx, sy, qx, qy = classification_batch(3, dtype=torch.float64)
    learner = MAML(model, inner_lr=[0.25, 0.125], inner_steps=2, lr_mode="per_layer_per_step", learn_lr=True)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    sched = MAMLPPSchedule(iterations=4, first_order_iterations=2, msl_iterations=0, meta_lr=1e-3, min_meta_lr=0.0)
    params = [p for p in model.parameters()]
    for it, fo in ((2, True), (3, False)):
        sched.apply(learner, opt, it)
        assert learner.first_order is fo
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr(it))
        for p in learner.parameters():
            p.grad = None
        learner.meta_step(sx, sy, qx, qy)
        got = torch.cat([p.grad.flatten() for p in params] + [learner.inner_lr.lr.grad.flatten()])
        ref = reference.meta_gradient(model, learner.inner_lr, learner.layout, sx, sy, qx, qy, 2, fo, [0.0, 1.0],
                                      None)
        want = torch.cat([ref.param_grads[n].flatten() for n, _ in model.named_parameters()]
                         + [ref.lr_grad.flatten()])
        assert float((got - want).norm() / want.norm()) < 1e-10


def test_msl_applied_to_the_learner():
    model = conv_bn().double()
    learner = MAML(model, inner_lr=0.25, inner_steps=3)
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    MAMLPPSchedule(iterations=2000, msl_iterations=1000).apply(learner, opt, 1)
    assert learner.multi_step_weights == pytest.approx([1 / 3] * 3)
    MAMLPPSchedule(iterations=2000, msl_iterations=1000).apply(learner, opt, 1001)
    assert learner.multi_step_weights is None


def test_mamlpp_configs_and_bad_settings():
    for name in ("mamlpp-omniglot-5w1s", "mamlpp-omniglot-5w5s", "mamlpp-omniglot-20w1s", "mamlpp-omniglot-20w5s"):
        c = configs.get(name)
        assert c["algorithm"] == "mamlpp" and c["lr_mode"] == "per_layer_per_step" and c["learn_lr"]
        assert c["meta_lr_schedule"] == "cosine" and 0 < c["first_order_iterations"] < c["iterations"]
    with pytest.raises(UserError, match="first_order_iterations=60000 is beyond the run's iterations=50000"):
        configs.resolve("mamlpp-omniglot-5w1s", ["first_order_iterations=60000"])
    with pytest.raises(UserError, match="msl_iterations=100 is beyond"):
        configs.resolve("mamlpp-omniglot-5w1s", ["iterations=50", "first_order_iterations=10", "msl_iterations=100"])
    with pytest.raises(ValueError, match="beyond the run"):
        MAMLPPSchedule(iterations=10, first_order_iterations=11)
    with pytest.raises(UserError, match="imaml_lambda=0.0"):
        configs.resolve("imaml-omniglot-5w1s", ["imaml_lambda=0"])
    with pytest.raises(UserError, match="cg_steps=0: must be >= 1"):
        configs.resolve("imaml-omniglot-5w1s", ["cg_steps=0"])


@pytest.mark.parametrize("name", ["mamlpp-omniglot-5w1s", "anil-omniglot-5w1s", "imaml-omniglot-5w1s",
                                  "reptile-omniglot-5w1s", "reptile-sinusoid"])
def test_algorithm_configs_train_from_the_cli(name, tmp_path):
    from fastmaml.app import cli

    if "omniglot" in name and not os.environ.get("FASTMAML_DATA"):
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/")
    sets = ["iterations=2", "meta_batch=2", "val_every=2", "val_episodes=2", "log_every=1", "eval_batch=2"]
    if "omniglot" in name:
        sets += ["hidden=4", "eval_queries=2"]
    if name.startswith("mamlpp"):
        sets += ["first_order_iterations=1", "msl_iterations=1", "inner_steps=2", "test_steps=2"]
    if name.startswith("imaml"):
        sets += ["inner_steps=2", "test_steps=2"]
    if name.startswith("reptile"):
        sets += ["test_steps=2"]
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["train", name, "--out", str(tmp_path / "run"), "--threads", "1", "--quiet", "--set", *sets])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()
