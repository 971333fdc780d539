"""The MAML sinusoid task distribution."""

import io
import math

import pytest
import torch

from fastmaml.data import Sinusoid


def test_shapes_and_function():
    ds = Sinusoid(shots=10, queries=7, seed=0)
    sx, sy, qx, qy, amp, phase = ds.sample(16, return_params=True)
    assert sx.shape == sy.shape == (16, 10, 1) and qx.shape == qy.shape == (16, 7, 1)
    assert all(t.dtype == torch.float32 for t in (sx, sy, qx, qy, amp, phase))
    assert amp.shape == phase.shape == (16,)
    a, p = amp[:, None, None], phase[:, None, None]
    assert torch.allclose(sy, a * torch.sin(sx - p), atol=1e-6)
    assert torch.allclose(qy, a * torch.sin(qx - p), atol=1e-6)
    la, lp = ds.last_params
    assert torch.equal(la, amp) and torch.equal(lp, phase)
    assert len(ds.sample(3)) == 4 and ds.last_params[0].shape == (3,)


def test_statistics_match_the_paper():
    ds = Sinusoid(shots=5, queries=5, seed=1)
    sx, sy, qx, qy, amp, phase = ds.sample(40000, return_params=True)
    x = torch.cat([sx, qx], 1)
    assert 0.1 <= amp.min() and amp.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    # uniform moments: mean (lo+hi)/2, variance (hi-lo)^2/12, within ~6 standard errors
    for v, lo, hi in ((amp, 0.1, 5.0), (phase, 0.0, math.pi), (x.flatten(), -5.0, 5.0)):
        n, var = v.numel(), (hi - lo) ** 2 / 12
        assert abs(v.double().mean().item() - (lo + hi) / 2) < 6 * math.sqrt(var / n)
        assert abs(v.double().var().item() - var) < 0.02 * var
    assert amp.min() < 0.2 and amp.max() > 4.9 and x.min() < -4.99 and x.max() > 4.99


def test_determinism_state_and_episodes():
    a, b, c = Sinusoid(seed=3), Sinusoid(seed=3), Sinusoid(seed=4)
    for x, y in zip(a.sample(8), b.sample(8)):
        assert torch.equal(x, y)
    assert not torch.equal(a.sample(8)[0], c.sample(8)[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    first = a.sample(5, return_params=True)
    buf.seek(0)
    a.load_state_dict(torch.load(buf, weights_only=True))
    for x, y in zip(first, a.sample(5, return_params=True)):
        assert torch.equal(x, y)
    state = a.state_dict()["generator_state"].clone()
    e1 = [t for t in a.episodes(300, batch=64, seed=9, return_params=True)]
    e2 = [t for t in a.episodes(300, batch=7, seed=9, return_params=True)]
    assert [t[0].shape[0] for t in e1] == [64, 64, 64, 64, 44]
    for i in range(6):
        assert torch.equal(torch.cat([t[i] for t in e1]), torch.cat([t[i] for t in e2]))
    assert torch.equal(a.state_dict()["generator_state"], state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shots"):
        Sinusoid(shots=0)
    with pytest.raises(ValueError, match="amplitude"):
        Sinusoid(amplitude=(5.0, 1.0))
    with pytest.raises(ValueError, match="num_tasks"):
        Sinusoid().sample(0)
