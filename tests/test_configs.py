"""The built-in configs, typed --set parsing, the paper's networks and the 95% CI (no training)."""

import math

import pytest
import torch
from torch import nn

from fastmaml import models
from fastmaml.app import configs
from fastmaml.app.episodes import mean_ci95
from fastmaml.app.errors import UserError

PAPER = {
    # name: (ways, shots, meta_batch, inner_lr, inner_steps, test_steps, hidden, iterations)
    "omniglot-5w1s": (5, 1, 32, 0.4, 1, 10, 64, 60000),
    "omniglot-5w5s": (5, 5, 32, 0.4, 1, 10, 64, 60000),
    "omniglot-20w1s": (20, 1, 16, 0.1, 5, 10, 64, 60000),
    "omniglot-20w5s": (20, 5, 16, 0.1, 5, 10, 64, 60000),
    "miniimagenet-5w1s": (5, 1, 4, 0.01, 5, 10, 32, 60000),
    "miniimagenet-5w5s": (5, 5, 4, 0.01, 5, 10, 32, 60000),
}


def test_every_config_has_iterations_and_seed_and_valid_values():
    assert set(PAPER) | {"sinusoid", "sinusoid-tiny", "omniglot-tiny"} <= set(configs.names())
    for name in configs.names():
        c = configs.get(name)
        assert isinstance(c["iterations"], int) and isinstance(c["seed"], int)
        assert c["config"] == name
        for k, v in c.items():
            if k != "config":
                configs.check_value(k, v, v)
        configs.check_config(c)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    ways, shots, mb, lr, steps, test_steps, hidden, iters = PAPER[name]
    for variant, fo in ((name, False), (name + "-fo", True)):
        c = configs.get(variant)
        assert (c["ways"], c["shots"], c["meta_batch"], c["inner_lr"], c["inner_steps"], c["test_steps"],
                c["hidden"], c["iterations"]) == (ways, shots, mb, lr, steps, test_steps, hidden, iters)
        assert c["first_order"] is fo
        assert c["meta_lr"] == 1e-3 and c["model"] == "conv4" and c["max_pool"] is True
    c = configs.get(name)
    if c["dataset"] == "miniimagenet":
        assert c["queries"] == 15 and c["grad_clip"] == 10.0 and c["image_size"] == 84
    else:
        assert c["queries"] == shots and c["grad_clip"] == 0.0 and c["image_size"] == 28


def test_sinusoid_config():
    c = configs.get("sinusoid")
    assert (c["hidden"], c["shots"], c["meta_batch"], c["inner_lr"], c["inner_steps"], c["meta_lr"],
            c["iterations"], c["test_steps"]) == ([40, 40], 10, 25, 0.01, 1, 1e-3, 70000, 10)


def test_set_parses_each_type():
    c = configs.resolve("sinusoid", ["iterations=1_000", "inner_lr=2e-2", "first_order=yes", "hidden=8,16",
                                     "memory=recompute", "meta_lr=1"])
    assert c["iterations"] == 1000 and c["inner_lr"] == 0.02 and c["first_order"] is True
    assert c["hidden"] == [8, 16] and c["memory"] == "recompute"
    assert isinstance(c["meta_lr"], float) and c["meta_lr"] == 1.0
    assert configs.resolve("sinusoid", ["first_order=False"])["first_order"] is False
    # the built-in table is not modified
    assert configs.get("sinusoid")["iterations"] == 70000


@pytest.mark.parametrize("assignment, expected", [
    ("iterations=1.5", "expected an int"),
    ("iterations=many", "expected an int"),
    ("inner_lr=fast", "expected a float"),
    ("inner_lr=nan", "expected a finite float"),
    ("first_order=maybe", "expected a bool"),
    ("hidden=a,b", "expected a comma-separated list of ints"),
    ("memory=lots", "expected one of store, recompute"),
    ("iterations=0", "must be >= 1"),
    ("inner_lr=-1", "must be >= 0"),
    ("iterations", "expected key=value"),
])
def test_set_rejects_bad_values_with_the_expected_type(assignment, expected):
    with pytest.raises(UserError, match=expected):
        configs.resolve("sinusoid", [assignment])


def test_unknown_key_and_config_list_the_valid_ones():
    with pytest.raises(UserError) as e:
        configs.resolve("sinusoid", ["ways=5"])  # not a sinusoid key
    assert "unknown key 'ways'" in str(e.value) and "iterations" in str(e.value) and "seed" in str(e.value)
    with pytest.raises(UserError) as e:
        configs.resolve("omniglot-5w7s")
    assert "unknown config" in str(e.value) and "omniglot-5w1s" in str(e.value) and "sinusoid" in str(e.value)
    with pytest.raises(UserError, match="fixed by the config"):
        configs.resolve("sinusoid", ["dataset=omniglot"])


def test_cross_key_checks():
    with pytest.raises(UserError, match="20 drawings"):
        configs.resolve("omniglot-5w5s", ["queries=16"])
    with pytest.raises(UserError, match="val_every=0"):
        configs.resolve("omniglot-5w1s", ["split_scheme=maml"])
    assert configs.resolve("omniglot-5w1s", ["split_scheme=maml", "val_every=0"])["split_scheme"] == "maml"


def test_config_file(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text('{"config": "sinusoid-tiny", "iterations": 7, "inner_lr": 1}')
    c = configs.resolve(str(p), ["seed=3"])
    assert c["config"] == "sinusoid-tiny" and c["iterations"] == 7 and c["inner_lr"] == 1.0 and c["seed"] == 3
    p.write_text('{"config": "sinusoid-tiny", "bogus": 1}')
    with pytest.raises(UserError, match="unknown keys bogus"):
        configs.resolve(str(p))


def test_differences_key_by_key():
    a = configs.get("sinusoid")
    b = configs.resolve("sinusoid", ["inner_lr=0.02", "iterations=5"])
    assert configs.differences(a, b) == [("inner_lr", 0.01, 0.02), ("iterations", 70000, 5)]
    assert configs.differences(a, b, ignore=["iterations"]) == [("inner_lr", 0.01, 0.02)]


# -- the networks -------------------------------------------------------------------------------------

def test_conv4_omniglot_and_miniimagenet_shapes():
    m = models.conv4(5)
    assert m.classifier.in_features == 64 and m.classifier.out_features == 5
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 64 for c in convs)
    assert len(bns) == 4 and all(not b.track_running_stats and b.running_mean is None for b in bns)
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.modules()) == 4
    mini = models.conv4(5, hidden=32, in_channels=3, image_size=84)
    assert mini.classifier.in_features == 32 * 25
    assert mini(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    strided = models.conv4(20, max_pool=False)
    assert strided.classifier.in_features == 64 and strided(torch.zeros(2, 1, 28, 28)).shape == (2, 20)
    assert not any(isinstance(x, nn.MaxPool2d) for x in strided.modules())


def test_conv4_uses_batch_statistics_in_eval_mode_too():
    torch.manual_seed(0)
    m = models.conv4(5, hidden=8).eval()
    x = torch.randn(6, 1, 28, 28)
    # batch statistics: the outputs of the first two images depend on the rest of the batch
    assert not torch.allclose(m(x)[:2], m(x[:2]), atol=1e-4)
    assert all(b.running_mean is None for b in m.modules() if isinstance(b, nn.BatchNorm2d))


def test_mlp_and_build():
    m = models.mlp()
    widths = [(l.in_features, l.out_features) for l in m if isinstance(l, nn.Linear)]
    assert widths == [(1, 40), (40, 40), (40, 1)]
    assert sum(isinstance(l, nn.ReLU) for l in m) == 2
    assert isinstance(models.build(configs.get("sinusoid")), nn.Sequential)
    assert models.build(configs.get("miniimagenet-5w1s")).classifier.in_features == 800
    assert models.build(configs.get("omniglot-20w1s")).classifier.out_features == 20


# -- the 95% confidence interval ------------------------------------------------------------------------

def test_ci95_against_a_hand_computed_example():
    # values 0.6, 0.8, 1.0, 1.0: mean 0.85; deviations -.25, -.05, .15, .15; sum of squares
    # 0.0625 + 0.0025 + 0.0225 + 0.0225 = 0.11; sample variance 0.11 / 3; s = 0.191485...
    # ci = 1.96 * 0.191485 / sqrt(4) = 0.187655...
    mean, ci = mean_ci95([0.6, 0.8, 1.0, 1.0])
    assert mean == pytest.approx(0.85)
    assert ci == pytest.approx(1.96 * math.sqrt(0.11 / 3) / 2)
    assert ci == pytest.approx(0.1876555, abs=1e-6)
    # 600 episodes, half at 1.0 and half at 0.0: s = sqrt(150 / 599 * 600 / 600) ...
    vals = [1.0] * 300 + [0.0] * 300
    s = math.sqrt(sum((v - 0.5) ** 2 for v in vals) / 599)
    assert mean_ci95(vals) == (pytest.approx(0.5), pytest.approx(1.96 * s / math.sqrt(600)))
    assert mean_ci95([0.7]) == (pytest.approx(0.7), None)


def test_the_library_and_the_configs_agree_on_the_init_of_old_runs():
    """fastmaml.models (the library) does not import the configs: it spells out the ``init`` of a
    config saved before the key existed; the two must agree."""
    assert models.INIT_OF_OLD_CONFIGS == configs.KEYS["init"].absent


def test_checkpoint_config_from_before_a_key_existed_takes_its_absent_value(tmp_path):
    """A run saved before ``resize`` existed (its config has no such key) evaluates and resumes as
    what it was, ``resize=lanczos``; a key without an ``absent`` value missing is still refused."""
    from fastmaml.app import evaluate as ev
    from fastmaml.app.checkpoint import CheckpointError

    old = configs.get("omniglot-5w1s")
    del old["resize"]
    got = ev.config_of({"config": dict(old)}, tmp_path / "checkpoint.pt")
    assert got["resize"] == "lanczos" and "resize" not in old
    assert configs.differences(old, configs.get("omniglot-5w1s")) == []
    assert [d[0] for d in configs.differences(old, configs.resolve("omniglot-5w1s", ["resize=nearest"]))] == ["resize"]
    del old["meta_batch"]
    with pytest.raises(CheckpointError, match=r"missing \['meta_batch'\]"):
        ev.config_of({"config": dict(old)}, tmp_path / "checkpoint.pt")


def test_resize_and_maml_val_settings():
    c = configs.resolve("omniglot-5w1s", ["resize=nearest", "split_scheme=maml_val"])
    assert c["resize"] == "nearest" and c["split_scheme"] == "maml_val" and c["val_every"] == 1000
    with pytest.raises(UserError, match="resize=bilinear: expected one of lanczos, nearest"):
        configs.resolve("omniglot-5w1s", ["resize=bilinear"])
