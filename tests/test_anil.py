"""ANIL (Raghu et al. 2020): the body's and the head's meta-gradient against a hand-written float64
per-task unrolled reference (autograd through the head's inner loop, the body run per task)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import ANIL
from fastmaml.models import conv4, mlp_bn


def _reference(model, body, head, sx, sy, qx, qy, lr, steps, first_order):
    """Literal per-task ANIL: features once per task and set, K SGD steps on the head's weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    T = sx.shape[0]
    total = 0.0
    for t in range(T):
        fs, fq = body(sx[t]), body(qx[t])
        w = [p for p in head.parameters()]
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(head, dict(zip([n for n, _ in head.named_parameters()], w)), (fs,)), sy[t])
            g = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = [a - lr * b for a, b in zip(w, g)]
        pred = torch.func.functional_call(head, dict(zip([n for n, _ in head.named_parameters()], w)), (fq,))
        total = total + F.cross_entropy(pred, qy[t]) / T
    return torch.autograd.grad(total, params), float(total.detach())


def _rel(a, b):
    a = torch.cat([x.flatten() for x in a])
    b = torch.cat([x.flatten() for x in b])
    return float((a - b).norm() / b.norm())


def _tasks(T, ways, shots, queries, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, ways * shots, *shape, generator=g, dtype=torch.float64)
    qx = torch.randn(T, ways * queries, *shape, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (2, True)])
def test_anil_mlp_matches_reference(steps, first_order):
    torch.manual_seed(0)
    model = mlp_bn(5, (24, 16), in_features=7 * 7).double()
    sx, sy, qx, qy = _tasks(3, 5, 2, 3, (1, 7, 7))
    learner = ANIL(model, inner_lr=0.25, inner_steps=steps, first_order=first_order)
    assert learner.execution_path.startswith("fused") or learner.head_engine.path().startswith("fused")
    out = learner.meta_step(sx, sy, qx, qy)
    got = [p.grad.clone() for p in model.parameters()]
    ref, loss = _reference(model, learner.body, learner.head, sx, sy, qx, qy, 0.25, steps, first_order)
    assert abs(float(out.loss) - loss) < 1e-10
    assert _rel(got, ref) < 1e-10
    # the body's part alone (it is most of the parameters and flows only through the features)
    nb = len(list(learner.body.parameters()))
    assert _rel(got[:nb], ref[:nb]) < 1e-10 and any(g.abs().sum() > 0 for g in got[:nb])


def test_anil_conv4_body_gradient_and_learned_lr():
    torch.manual_seed(1)
    model = conv4(3, hidden=4, image_size=16).double()
    sx, sy, qx, qy = _tasks(2, 3, 1, 2, (1, 16, 16), seed=1)
    learner = ANIL(model, inner_lr=0.5, inner_steps=2, learn_lr=True)
    learner.meta_step(sx, sy, qx, qy)
    got = [p.grad.clone() for p in model.parameters()]
    lr = learner.inner_lr.lr
    # the reference with a differentiable learning rate
    lr_leaf = lr.detach().clone().requires_grad_(True)
    params = list(model.parameters())
    head = learner.head
    names = [n for n, _ in head.named_parameters()]
    total = 0.0
    for t in range(2):
        fs, fq = learner.body(sx[t]), learner.body(qx[t])
        w = list(head.parameters())
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(head, dict(zip(names, w)), (fs,)), sy[t])
            g = torch.autograd.grad(loss, w, create_graph=True)
            w = [a - lr_leaf * b for a, b in zip(w, g)]
        total = total + F.cross_entropy(torch.func.functional_call(head, dict(zip(names, w)), (fq,)), qy[t]) / 2
    ref = torch.autograd.grad(total, params + [lr_leaf])
    assert _rel(got, ref[:-1]) < 1e-10
    assert abs(float(lr.grad) - float(ref[-1])) < 1e-10 * max(1.0, abs(float(ref[-1])))


def test_anil_bad_model():
    with pytest.raises(TypeError, match="nn.Sequential"):
        ANIL(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="trailing children"):
        ANIL(nn.Sequential(nn.Linear(3, 2)))
