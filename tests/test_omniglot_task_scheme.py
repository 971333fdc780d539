"""Omniglot training tasks as the MAML code draws them (issue 22): ``task_rotations="character"``
(N distinct characters, each at its own random rotation) and ``task_pool=P`` (P tasks drawn up front,
cycled in order, the rotations drawn again each time). Checked on the real data (``FASTMAML_DATA``)
by reading each task's classes back from the image indices and the class names, not from the
sampler's internals; and the defaults draw exactly what the code before these options drew.
"""

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastmaml.app import cli
from fastmaml.data import Omniglot

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def data():
    root = os.environ.get("FASTMAML_DATA")
    if not root or not (Path(root) / "omniglot").is_dir():
        pytest.skip("FASTMAML_DATA is unset: set it to the folder holding omniglot/ (e.g. /work/shared/data)")
    return Path(root) / "omniglot"


def train_sampler(data, **kw):
    kw.setdefault("split_scheme", "maml")
    return Omniglot(data, split="train", **kw)


def tasks(o, *sizes):
    """Each task's [(character, rotation, drawing) per class, in label order], read from the
    indices: the class is ``image id // 20``, its name ``Alphabet/characterNN/rotDDD``."""
    out = []
    for n in sizes:
        si = o.sample(n, return_indices=True)[4]
        for row in si.tolist():
            task = []
            for i in row[:: o.shots]:
                char, rot = o.class_names[i // o.examples_per_class].rsplit("/", 1)
                task.append((char, rot, i % o.examples_per_class))
            out.append(task)
    return out


def test_defaults_draw_what_the_code_before_these_options_drew(data):
    """The sha256 of three meta-batches' image indices and the generator state after them, 5-way
    1-shot and 20-way 5-shot, computed with the code of commit bd139a4 (before ``task_pool`` and
    ``task_rotations``): the runs started before them resume bit for bit."""
    h = hashlib.sha256()
    for ways, shots in ((5, 1), (20, 5)):
        o = train_sampler(data, ways=ways, shots=shots, queries=shots, seed=11)
        for _ in range(3):
            sx, sy, qx, qy, si, qi = o.sample(16, return_indices=True)
            h.update(si.numpy().tobytes())
            h.update(qi.numpy().tobytes())
        h.update(o.state_dict()["generator_state"].numpy().tobytes())
    assert h.hexdigest() == "9c7e3c640346b86363585d0af9cd408c1c419456f16ab4e9483e5a16681705c5"


def test_character_tasks_hold_distinct_characters_at_uniform_rotations(data):
    """20-way: every task's 20 classes are 20 different characters; the 4,000 rotations are uniform
    over the four (each count within 5 standard deviations of 1,000). The default draws tasks that
    hold one character twice (11 % of 20-way tasks), so the first assertion tells the two apart."""
    by_char = tasks(train_sampler(data, ways=20, shots=1, queries=1, task_rotations="character", seed=5), 100, 100)
    assert len(by_char) == 200
    assert all(len({c for c, _, _ in t}) == 20 for t in by_char)
    counts = Counter(r for t in by_char for _, r, _ in t)
    assert sorted(counts) == ["rot000", "rot090", "rot180", "rot270"]
    assert all(abs(n - 1000) < 5 * (4000 * 0.25 * 0.75) ** 0.5 for n in counts.values()), counts
    by_class = tasks(train_sampler(data, ways=20, shots=1, queries=1, seed=5), 100, 100)
    assert sum(len({c for c, _, _ in t}) < 20 for t in by_class) > 5


def test_the_pool_cycles_keeps_characters_and_drawings_and_redraws_rotations(data):
    """A pool of 50 tasks sampled as 30 + 30 + 40: task i + 50 has task i's characters and drawings
    in the same label order; with ``task_rotations="character"`` its rotations are drawn again
    (some differ), with the default the whole task repeats. The pool is 50 different tasks."""
    o = train_sampler(data, ways=5, shots=1, queries=3, task_rotations="character", task_pool=50, seed=7)
    t = tasks(o, 30, 30, 40)
    assert len({tuple((c, d) for c, _, d in task) for task in t[:50]}) == 50
    for i in range(50):
        assert [(c, d) for c, _, d in t[i]] == [(c, d) for c, _, d in t[i + 50]]
    assert sum(t[i] != t[i + 50] for i in range(50)) > 40  # 5 rotations redrawn: P(same) = 1/1024
    fixed = tasks(train_sampler(data, ways=5, shots=1, queries=3, task_pool=50, seed=7), 30, 30, 40)
    assert fixed[:50] == fixed[50:]
    assert len({tuple(task) for task in fixed[:50]}) == 50


def test_the_pool_resumes_and_follows_the_seed_alone(data):
    """``state_dict`` / ``load_state_dict`` in the middle of a cycle continues it exactly (query
    images too); the pool depends on ``seed`` only; evaluation episodes never come from the pool
    (those of a sampler without one are the same)."""
    kw = dict(ways=5, shots=1, queries=3, task_rotations="character", task_pool=40)
    a = train_sampler(data, seed=9, **kw)
    a.sample(25)
    state = a.state_dict()
    want = a.sample(30, return_indices=True)
    b = train_sampler(data, seed=0, **kw)
    b.sample(3)
    b.load_state_dict(state)
    got = b.sample(30, return_indices=True)
    for x, y in zip(want, got):
        assert torch.equal(x, y)
    c = train_sampler(data, seed=9, **kw)
    other = train_sampler(data, seed=10, **kw)
    first, second = tasks(c, 40), tasks(other, 40)
    assert [[(ch, d) for ch, _, d in t] for t in first] != [[(ch, d) for ch, _, d in t] for t in second]
    plain = train_sampler(data, seed=9, ways=5, shots=1, queries=3, task_rotations="character")
    for x, y in zip(next(c.episodes(20, batch=20, seed=1, return_indices=True)),
                    next(plain.episodes(20, batch=20, seed=1, return_indices=True))):
        assert torch.equal(x, y)


def test_evaluation_episodes_by_character(data):
    """``episodes`` follow ``task_rotations`` too (the MAML code's test tasks: 20 distinct characters
    over the 423 test characters, where 29 % of class-drawn 20-way tasks repeat one), fixed by the
    seed."""
    kw = dict(split="test", split_scheme="maml", ways=20, shots=1, queries=1)

    def chars(o):
        return [[o.class_names[i // 20].rsplit("/", 1)[0] for i in row]
                for *_, si, _ in o.episodes(100, batch=50, seed=2, return_indices=True) for row in si.tolist()]

    by_char = chars(Omniglot(data, task_rotations="character", **kw))
    assert all(len(set(t)) == 20 for t in by_char)
    assert by_char == chars(Omniglot(data, task_rotations="character", **kw))
    by_class = chars(Omniglot(data, **kw))
    assert 15 <= sum(len(set(t)) < 20 for t in by_class) <= 45


def test_bad_arguments_name_what_was_given(data):
    with pytest.raises(ValueError, match=r"task_rotations: expected one of class, character, got 'chars'"):
        train_sampler(data, task_rotations="chars")
    with pytest.raises(ValueError, match=r"task_pool: expected an int >= 0, got -1"):
        train_sampler(data, task_pool=-1)
    with pytest.raises(ValueError, match=r"ways: task_rotations='character' needs at most 1200 .*got 1201"):
        train_sampler(data, ways=1201, task_rotations="character")


def test_cli_trains_with_the_codes_tasks_and_resumes_bitwise(data, tmp_path):
    """``--set task_rotations=character task_pool=24``: 6 iterations of 8 tasks in one go, and 2 (16
    tasks: in the middle of the first cycle) then a resume to 6, end with the same parameters (the
    pool's place comes back from the checkpoint)."""
    common = ["--data", str(data.parent), "--threads", "1", "--quiet", "--set", "task_rotations=character",
              "task_pool=24", "meta_batch=8", "val_every=0", "checkpoint_every=2", "log_every=2"]
    threads = torch.get_num_threads()
    try:
        whole, split = tmp_path / "whole", tmp_path / "split"
        assert cli.main(["train", "omniglot-tiny", "--out", str(whole), *common, "iterations=6"]) == 0
        assert cli.main(["train", "omniglot-tiny", "--out", str(split), *common, "iterations=2"]) == 0
        assert cli.main(["train", "omniglot-tiny", "--out", str(split), *common, "iterations=6", "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the test episodes: by class unless asked (the config's task_rotations is the training's)
    for flag, want in ((), "class"), (("--task-rotations", "character"), "character"):
        assert cli.main(["eval", str(whole), "--episodes", "4", "--quiet", "--threads", "1", *flag]) == 0
        assert json.loads((whole / "eval.json").read_text())["task_rotations"] == want
