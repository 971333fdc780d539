"""The generic on-device episode sampler: episode validity, randomness, determinism, state."""

import io
import math

import pytest
import torch

from fastmaml.data import TaskSampler
from fastmaml.data.sampler import EVAL_CHUNK, sample_without_replacement


def make_images(classes=12, examples=10, h=4, w=3):
    # every image unique and decodable back to (class, example): pixel 0 = class, pixel 1 = example
    x = torch.randint(0, 256, (classes, examples, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, :, 0, 0] = torch.arange(classes, dtype=torch.uint8)[:, None]
    x[:, :, 0, 1] = torch.arange(examples, dtype=torch.uint8)[None, :]
    return x


def check_episode(sampler, out, ways, shots, queries):
    sx, sy, qx, qy, sidx, qidx = out
    t = sx.shape[0]
    e = sampler.examples_per_class
    assert sx.shape == (t, ways * shots, *sampler.item_shape) and sx.dtype == torch.float32
    assert qx.shape == (t, ways * queries, *sampler.item_shape) and qx.dtype == torch.float32
    assert sy.shape == (t, ways * shots) and sy.dtype == torch.int64
    assert qy.shape == (t, ways * queries) and qy.dtype == torch.int64
    flat = sampler.images.flatten(0, 1)
    assert torch.equal(sx, flat[sidx].float().view_as(sx))
    assert torch.equal(qx, flat[qidx].float().view_as(qx))
    for i in range(t):
        s, q = sidx[i].tolist(), qidx[i].tolist()
        assert len(set(s)) == len(s) and len(set(q)) == len(q)
        assert not set(s) & set(q), "support and query share an image"
        label_to_class = {}
        for ids, ys in ((s, sy[i].tolist()), (q, qy[i].tolist())):
            for img, y in zip(ids, ys):
                assert label_to_class.setdefault(y, img // e) == img // e, "a label maps to two classes"
        assert sorted(label_to_class) == list(range(ways))
        assert len(set(label_to_class.values())) == ways
        for y in range(ways):
            assert sy[i].tolist().count(y) == shots and qy[i].tolist().count(y) == queries


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 3), (3, 2, 8), (12, 1, 0), (1, 10, 0)])
def test_episodes_are_valid(ways, shots, queries):
    ts = TaskSampler(make_images(), ways, shots, queries, seed=3)
    for t in (1, 7):
        check_episode(ts, ts.sample(t, return_indices=True), ways, shots, queries)
    check_episode(ts, next(iter(ts.episodes(5, batch=5, seed=1, return_indices=True))), ways, shots, queries)


def test_large_population_path_is_valid():
    # k * k <= n takes the rejection path on the CPU, for classes and for examples
    ts = TaskSampler(make_images(classes=200, examples=40), 5, 2, 3, seed=0)
    check_episode(ts, ts.sample(16, return_indices=True), 5, 2, 3)


def test_item_shape_scale_and_shift():
    imgs = make_images(classes=6, examples=4, h=2, w=3).view(6, 4, 3, 2)  # items: 3 "channels" x 2
    scale = torch.tensor([1.0, 2.0, 0.5]).view(3, 1)
    shift = torch.tensor([0.0, -1.0, 3.0]).view(3, 1)
    ts = TaskSampler(imgs, 2, 1, 1, scale=scale, shift=shift)
    sx, _, qx, _, si, qi = ts.sample(3, return_indices=True)
    raw = imgs.flatten(0, 1)[si].float()
    assert torch.allclose(sx, raw * scale + shift)
    ts2 = TaskSampler(imgs, 2, 1, 1, item_shape=(1, 3, 2))
    assert ts2.sample(2)[0].shape == (2, 2, 1, 3, 2)


@pytest.mark.parametrize("n,k", [(40, 3), (25, 5), (10, 4), (6, 6)])  # rejection (1 and several rounds), topk
def test_without_replacement_is_uniform(n, k):
    g = torch.Generator().manual_seed(0)
    draws = 40000
    s = sample_without_replacement((draws,), n, k, g, torch.device("cpu"))
    assert s.shape == (draws, k)
    assert (s.sort(-1).values.diff(dim=-1) > 0).all(), "repeated value"
    # each position is uniform over range(n) (chi-square, ~5 sigma bound)
    for pos in range(k):
        counts = torch.bincount(s[:, pos], minlength=n).double()
        exp = draws / n
        chi2 = ((counts - exp) ** 2 / exp).sum().item()
        assert chi2 < (n - 1) + 5 * math.sqrt(2 * (n - 1)), (pos, chi2)
    # ordered pairs of the first two positions are uniform too
    if k >= 2 and n <= 25:
        pair = s[:, 0] * n + s[:, 1]
        counts = torch.bincount(pair, minlength=n * n).double().view(n, n)
        off = counts[~torch.eye(n, dtype=torch.bool)]
        exp = draws / (n * (n - 1))
        chi2 = ((off - exp) ** 2 / exp).sum().item()
        df = n * (n - 1) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df)


def test_labels_are_random_per_task():
    ts = TaskSampler(make_images(classes=5), 5, 1, 1, seed=0)
    _, sy, _, _, si, _ = ts.sample(500, return_indices=True)
    cls_of_label0 = si[:, 0] // ts.examples_per_class
    assert len(set(cls_of_label0.tolist())) == 5  # label 0 lands on every class


def test_same_seed_same_episodes_different_seed_different():
    imgs = make_images()
    a, b, c = (TaskSampler(imgs, 5, 1, 2, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        ea, eb, ec = a.sample(4, return_indices=True), b.sample(4, return_indices=True), c.sample(4, return_indices=True)
        for x, y in zip(ea, eb):
            assert torch.equal(x, y)
    assert not torch.equal(ea[4], ec[4])


def test_state_round_trip_through_torch_save():
    ts = TaskSampler(make_images(), 5, 1, 2, seed=1)
    ts.sample(3)
    buf = io.BytesIO()
    torch.save(ts.state_dict(), buf)
    first = ts.sample(6, return_indices=True)
    ts.sample(2)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    ts.load_state_dict(state)
    again = ts.sample(6, return_indices=True)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    # a fresh sampler resumes too
    other = TaskSampler(make_images(), 5, 1, 2, seed=99)
    other.load_state_dict(state)
    assert other.seed == 1 and other.tasks_sampled == 3
    assert torch.equal(other.sample(6, return_indices=True)[4], first[4])
    with pytest.raises(ValueError, match="generator_state"):
        ts.load_state_dict({"seed": 1})


def test_evaluation_episodes_fixed_and_independent():
    ts = TaskSampler(make_images(), 4, 1, 3, seed=0)
    state = ts.state_dict()["generator_state"].clone()
    n = EVAL_CHUNK + 37
    by32 = list(ts.episodes(n, batch=32, seed=5, return_indices=True))
    assert [b[0].shape[0] for b in by32] == [32] * (n // 32) + [n % 32]
    idx32 = torch.cat([b[4] for b in by32])
    idx100 = torch.cat([b[4] for b in ts.episodes(n, batch=100, seed=5, return_indices=True)])
    idx_all = torch.cat([b[4] for b in ts.episodes(n, batch=1000, seed=5, return_indices=True)])
    assert torch.equal(idx32, idx100) and torch.equal(idx32, idx_all)
    prefix = torch.cat([b[4] for b in ts.episodes(50, batch=8, seed=5, return_indices=True)])
    assert torch.equal(prefix, idx32[:50])
    other = torch.cat([b[4] for b in ts.episodes(n, batch=32, seed=6, return_indices=True)])
    assert not torch.equal(other, idx32)
    assert torch.equal(ts.state_dict()["generator_state"], state), "episodes() moved the training generator"
    assert list(ts.episodes(0, batch=4, seed=1)) == []


def test_bad_arguments():
    imgs = make_images(classes=6, examples=5)
    with pytest.raises(ValueError, match=r"ways: expected at most 6 .* got 7"):
        TaskSampler(imgs, 7, 1, 1)
    with pytest.raises(ValueError, match=r"shots \+ queries: expected at most 5 .*got shots=2 \+ queries=4 = 6"):
        TaskSampler(imgs, 2, 2, 4)
    with pytest.raises(ValueError, match="shots"):
        TaskSampler(imgs, 2, 0, 1)
    with pytest.raises(TypeError, match="ways"):
        TaskSampler(imgs, 2.5, 1, 1)
    with pytest.raises(TypeError, match="uint8"):
        TaskSampler(imgs.float(), 2, 1, 1)
    ts = TaskSampler(imgs, 2, 1, 1)
    with pytest.raises(ValueError, match="num_tasks"):
        ts.sample(0)
    with pytest.raises(ValueError, match="batch"):
        ts.episodes(10, batch=0)
