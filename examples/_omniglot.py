"""Omniglot episodes for the examples: ``fastmaml.data.Omniglot`` ($FASTMAML_DATA/omniglot, or the
cache), raising ``fastmaml.data.DataNotFound`` when the data is absent."""

from __future__ import annotations

from fastmaml.data import Omniglot


def omniglot_tasks(ways: int, shots: int, queries: int, seed: int = 0, split: str = "train") -> Omniglot:
    return Omniglot(split=split, ways=ways, shots=shots, queries=queries, seed=seed, num_workers=1)
