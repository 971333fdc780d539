"""``fastmaml.tf_adam.TFEpsilonAdam`` (``adam_epsilon=tf``) against TensorFlow's Adam written out by
hand from its documented update (``tf.train.AdamOptimizer``: lr_t = lr * sqrt(1 - beta2^t) /
(1 - beta1^t), theta -= lr_t * m_t / (sqrt(v_t) + eps)), in float64, on gradients spanning ten
orders of magnitude so that epsilon matters for some of them."""

import math

import pytest
import torch

from fastmaml.app import cli
from fastmaml.tf_adam import TFEpsilonAdam


def tf_adam_by_hand(theta, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        theta = theta - lr_t * m / (v.sqrt() + eps)
        out.append(theta.clone())
    return out


def gradients(n_steps, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.linspace(-10, 0, 64, dtype=torch.float64)  # 1e-10 .. 1
    return [torch.randn(64, generator=g, dtype=torch.float64) * scale for _ in range(n_steps)]


def run(opt_class, grads, lr, **kw):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))
    opt = opt_class([p], lr=lr, **kw)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


def test_tf_epsilon_adam_is_tensorflows_update():
    grads = gradients(8, seed=3)
    theta0 = torch.linspace(-1, 1, 64, dtype=torch.float64)
    want = tf_adam_by_hand(theta0, grads, lr=1e-3)
    got = run(TFEpsilonAdam, grads, lr=1e-3)
    for w, x in zip(want, got):
        assert float((x - w).norm() / (w - theta0).norm()) < 1e-12
    # PyTorch's Adam is not TensorFlow's where the gradients are near eps: the test tells them apart
    torch_adam = run(torch.optim.Adam, grads, lr=1e-3)
    small = slice(0, 16)  # gradients 1e-10 .. 1e-8
    assert float((torch_adam[0][small] - want[0][small]).abs().max()) > 1e-4


def test_tf_epsilon_adam_resumes_from_its_state_dict():
    grads = gradients(6, seed=4)
    whole = run(TFEpsilonAdam, grads, lr=2e-3)[-1]
    p = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))
    opt = TFEpsilonAdam([p], lr=2e-3)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    state = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = TFEpsilonAdam([q], lr=2e-3)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    assert torch.equal(q.detach(), whole)


def test_adam_epsilon_config(tmp_path, capsys):
    """``--set adam_epsilon=tf`` trains with it and resumes; refused where the meta-optimizer is SGD."""
    threads = torch.get_num_threads()
    base = ["--threads", "1", "--quiet", "--set", "val_every=0", "checkpoint_every=2", "adam_epsilon=tf"]
    try:
        assert cli.main(["train", "sinusoid-tiny", "--out", str(tmp_path / "a"), *base, "iterations=4"]) == 0
        assert cli.main(["train", "sinusoid-tiny", "--out", str(tmp_path / "b"), *base, "iterations=2"]) == 0
        assert cli.main(["train", "sinusoid-tiny", "--out", str(tmp_path / "b"), *base, "iterations=4",
                         "--resume"]) == 0
        capsys.readouterr()
        assert cli.main(["train", "reptile-sinusoid", "--out", str(tmp_path / "r"), *base, "iterations=1"]) == 2
        assert "adam_epsilon=tf: this config's meta-optimizer is SGD" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"][0]["eps"] == pytest.approx(1e-8 / math.sqrt(1 - 0.999 ** 4))
