"""Omniglot class splits.

Class names are ``Alphabet/characterNN/rotDDD``: character ``Alphabet/characterNN`` rotated
counter-clockwise by DDD degrees (``torch.rot90(image, k=DDD // 90, dims=(-2, -1))``, the
direction of PIL's ``Image.rotate(DDD)``).

* ``vinyals``: the split of Vinyals et al. (2016), shipped as package data
  (``fastmaml/data/splits/vinyals/{train,val,test,trainval}.txt``, copied verbatim from the data
  distribution): 1028 / 172 / 423 characters, each with its 4 rotations; ``trainval`` = train + val.
* ``maml``: the MAML paper's protocol: 1200 characters for meta-training, the other 423 for
  meta-testing. The 1200 are chosen by a fixed seeded shuffle that depends on nothing but the
  character names: all characters ordered by ``sha256(f"{MAML_SPLIT_SEED}/{name}")`` (hex digest),
  the first 1200 are ``train``, the rest ``test``; each list is then sorted by name.
* ``maml_val``: the split of the MAML code (``data_generator.py``), which holds 100 of the 1200
  out of training for validation: ``train`` = the first 1100 characters of that order, ``val`` = the
  next 100, ``test`` = the same 423 as ``maml``. (The code's first release evaluated
  ``--test_set=True`` on the 100 validation characters; a fix of October 2017 swapped them back.)
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import List, Sequence

VINYALS_SPLITS = ("train", "val", "test", "trainval")
MAML_SPLITS = ("train", "test")
MAML_VAL_SPLITS = ("train", "val", "test")
SCHEMES = {"vinyals": VINYALS_SPLITS, "maml": MAML_SPLITS, "maml_val": MAML_VAL_SPLITS}
ROTATIONS = (0, 90, 180, 270)
MAML_SPLIT_SEED = 0
MAML_TRAIN_CHARACTERS = 1200
MAML_VAL_CHARACTERS = 100  # maml_val: the last 100 of the 1200, as the MAML code's num_val


class PackageFileMissing(RuntimeError):
    """A data file that ships inside the fastmaml package is missing (an incomplete installation)."""


def check_split(split_scheme: str, split: str) -> None:
    """ValueError for an unknown scheme or a split the scheme does not have."""
    if split_scheme not in SCHEMES:
        raise ValueError(f"split_scheme: expected one of {sorted(SCHEMES)}, got {split_scheme!r}")
    if split not in SCHEMES[split_scheme]:
        raise ValueError(
            f"split: expected one of {list(SCHEMES[split_scheme])} for split_scheme={split_scheme!r}, got {split!r}"
        )


def vinyals_classes(split: str, rotations: bool = True) -> List[str]:
    """Class names of a Vinyals split, in file order; only the ``rot000`` ones if not ``rotations``."""
    check_split("vinyals", split)
    ref = resources.files(__package__).joinpath("splits", "vinyals", f"{split}.txt")
    try:
        text = ref.read_text("utf-8")
    except OSError as e:
        raise PackageFileMissing(
            f"fastmaml's packaged split file fastmaml/data/splits/vinyals/{split}.txt is missing or unreadable "
            f"({ref}: {e.strerror or type(e).__name__}); the installation is incomplete: reinstall fastmaml "
            "(pip install -e . in its repository)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not rotations:
        names = [n for n in names if n.endswith("/rot000")]
    return names


def maml_characters(all_characters: Sequence[str], split: str, scheme: str = "maml") -> List[str]:
    """The characters of ``split`` under ``scheme`` (``"maml"`` or ``"maml_val"``) out of
    ``all_characters`` (see module docstring)."""
    if scheme not in ("maml", "maml_val"):
        raise ValueError(f"scheme: expected 'maml' or 'maml_val', got {scheme!r}")
    check_split(scheme, split)
    chars = sorted(set(all_characters))
    if len(chars) <= MAML_TRAIN_CHARACTERS:
        raise ValueError(
            f"split_scheme='maml': expected more than {MAML_TRAIN_CHARACTERS} characters "
            f"(1623 in Omniglot), got {len(chars)}"
        )
    order = sorted(chars, key=lambda c: hashlib.sha256(f"{MAML_SPLIT_SEED}/{c}".encode("utf-8")).hexdigest())
    n_train = MAML_TRAIN_CHARACTERS - (MAML_VAL_CHARACTERS if scheme == "maml_val" else 0)
    if split == "train":
        chosen = order[:n_train]
    elif split == "val":
        chosen = order[n_train:MAML_TRAIN_CHARACTERS]
    else:
        chosen = order[MAML_TRAIN_CHARACTERS:]
    return sorted(chosen)


def with_rotations(characters: Sequence[str], rotations: bool = True) -> List[str]:
    """``Alphabet/characterNN`` -> class names with each rotation (or only ``rot000``)."""
    rots = ROTATIONS if rotations else (0,)
    return [f"{c}/rot{r:03d}" for c in characters for r in rots]


def parse_class(name: str):
    """``Alphabet/characterNN/rotDDD`` -> (``Alphabet/characterNN``, quarter turns k in 0..3)."""
    char, _, rot = name.rpartition("/")
    if not rot.startswith("rot") or not rot[3:].isdigit() or int(rot[3:]) not in ROTATIONS:
        raise ValueError(f"class name: expected 'Alphabet/characterNN/rotDDD' with DDD in 000/090/180/270, got {name!r}")
    return char, int(rot[3:]) // 90
