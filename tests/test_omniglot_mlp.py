"""The MAML paper's Omniglot network without convolutions (section 5.2) and its configs: the
architecture, the fused path, and its meta-gradient against a hand-written float64 per-task MAML."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import MAML, models
from fastmaml.app import configs


def test_architecture_and_fused_path():
    m = models.mlp_bn(5)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Flatten"] + ["Linear", "BatchNorm1d", "ReLU"] * 4 + ["Linear"]
    widths = [(x.in_features, x.out_features) for x in m if isinstance(x, nn.Linear)]
    assert widths == [(784, 256), (256, 128), (128, 64), (64, 64), (64, 5)]
    assert all(not x.track_running_stats for x in m if isinstance(x, nn.BatchNorm1d))
    assert MAML(m).execution_path.startswith("fused")
    with pytest.raises(ValueError):
        models.mlp_bn(5, ())


@pytest.mark.parametrize("shots", [1, 5])
def test_configs_have_the_papers_hyperparameters(shots):
    c = configs.get(f"omniglot-mlp-5w{shots}s")
    assert (c["model"], c["hidden"], c["ways"], c["shots"], c["queries"], c["inner_lr"], c["inner_steps"],
            c["meta_batch"], c["meta_lr"], c["iterations"], c["image_size"]) == (
        "mlp_bn", [256, 128, 64, 64], 5, shots, shots, 0.4, 1, 32, 1e-3, 60000, 28)
    m = models.build(c)
    assert isinstance(m, nn.Sequential) and m[-1].out_features == 5
    # the code's initialization (construct_fc_weights; tf.contrib.layers.batch_norm: no scale, eps 1e-3)
    assert c["init"] == "paper"
    assert all(x.weight.abs().max() <= 0.02 and not x.bias.any() for x in m if isinstance(x, nn.Linear))
    assert all(x.eps == 1e-3 and not x.weight.requires_grad for x in m if isinstance(x, nn.BatchNorm1d))


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_against_per_task_reference(steps):
    torch.manual_seed(0)
    m = models.mlp_bn(5, (12, 10, 8, 8), in_features=6 * 6).double()
    T, lr = 3, 0.25
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(T, 5, 1, 6, 6, generator=g, dtype=torch.float64)
    qx = torch.randn(T, 10, 1, 6, 6, generator=g, dtype=torch.float64)
    sy = torch.arange(5).expand(T, -1).contiguous()
    qy = torch.arange(5).repeat(2).expand(T, -1).contiguous()
    learner = MAML(m, inner_lr=lr, inner_steps=steps)
    assert learner.execution_path.startswith("fused")
    learner.meta_step(sx, sy, qx, qy)
    got = torch.cat([p.grad.flatten() for p in m.parameters()])
    # by hand: Linear weights and biases adapt, BatchNorm's scale and shift do not; per-task statistics
    names = [n for n, _ in m.named_parameters()]
    adapted = [n for n in names if not isinstance(m.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm1d)]
    params = dict(m.named_parameters())

    def forward(w, x):
        h = x.flatten(1)
        for i, layer in enumerate(m):
            if isinstance(layer, nn.Linear):
                h = h @ w[f"{i}.weight"].T + w[f"{i}.bias"]
            elif isinstance(layer, nn.BatchNorm1d):
                mu, var = h.mean(0), h.var(0, unbiased=False)
                h = (h - mu) / torch.sqrt(var + layer.eps) * params[f"{i}.weight"] + params[f"{i}.bias"]
            elif isinstance(layer, nn.ReLU):
                h = h.clamp_min(0)
        return h

    total = 0.0
    for t in range(T):
        w = {n: params[n] for n in adapted}
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(w, sx[t]), sy[t]), list(w.values()), create_graph=True)
            w = {n: v - lr * gv for (n, v), gv in zip(w.items(), grads)}
        total = total + F.cross_entropy(forward(w, qx[t]), qy[t]) / T
    want = torch.cat([x.flatten() for x in torch.autograd.grad(total, list(m.parameters()))])
    assert float((got - want).norm() / want.norm()) < 1e-10
