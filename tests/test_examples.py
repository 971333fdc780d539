"""The four published examples' workloads (examples/) run a few iterations on tiny settings.

Omniglot comes from $FASTMAML_DATA/omniglot (or fastmaml's cache); those examples skip, naming the
reason, where it is absent. The import-swap (compat) and the batched port of one example must give the
same losses: they compute the same meta-gradients."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def example(name):
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def omniglot_or_skip():
    from fastmaml.data import DataNotFound
    try:
        example("_omniglot").omniglot_tasks(5, 1, 1)
    except DataNotFound as e:
        pytest.skip(f"Omniglot data not found (set FASTMAML_DATA to the folder holding omniglot/): {e}")


def same(a, b):
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                          rtol=1e-4, atol=1e-5)


def test_maml_sine_batched_equals_compat():
    m = example("maml_sine")
    batched = m.main(["--tiny", "--mode", "batched"])
    compat = m.main(["--tiny", "--mode", "compat"])
    assert len(batched) == 3 and same(batched, compat)


@pytest.mark.parametrize("name", ["l2l_maml_omniglot", "higher_maml_omniglot", "torchopt_maml_omniglot"])
def test_omniglot_examples_batched_equals_compat(name):
    omniglot_or_skip()
    m = example(name)
    batched = m.main(["--tiny", "--mode", "batched"])
    compat = m.main(["--tiny", "--mode", "compat"])
    assert len(batched) == 2 and same(batched, compat)
