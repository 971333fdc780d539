"""Tiny fabricated datasets in the real on-disk layouts, for tests and examples without the data.

* ``fake_omniglot(folder, characters)``: ``images_background.zip`` / ``images_evaluation.zip`` with
  members ``<part>/<Alphabet>/characterNN/NNNN_DD.png``: 105x105 1-bit PNGs, black random strokes on
  white, 20 drawings per character.
* ``fake_miniimagenet(folder, layout, ...)``: ``mini-imagenet-cache-<split>.pkl`` pickles or
  ``images/`` + ``<split>.csv``, with random RGB images.

Everything is deterministic given ``seed``. Nothing here is real data.
"""

from __future__ import annotations

import csv
import io
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw


def fake_stroke_png(rng: np.random.Generator, size: int = 105, strokes: int = 3) -> bytes:
    """A 1-bit PNG: white background, ``strokes`` black random polylines 3 px wide."""
    im = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(strokes):
        pts = [tuple(int(v) for v in rng.integers(10, size - 10, 2)) for _ in range(3)]
        draw.line(pts, fill=0, width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def fake_omniglot(
    folder: Path,
    background: Sequence[str] = ("Alpha/character01", "Alpha/character02", "Beta/character01"),
    evaluation: Sequence[str] = ("Gamma/character01", "Gamma/character02"),
    drawings: int = 20,
    seed: int = 0,
    extract: bool = False,
) -> Dict[str, Path]:
    """Write fake Omniglot zips (or, with ``extract``, the folders) into ``folder``; character
    names are ``Alphabet/characterNN``. Returns ``{part: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    serial = 1
    for part, chars in (("images_background", background), ("images_evaluation", evaluation)):
        members = []
        for c in chars:
            for d in range(1, drawings + 1):
                members.append((f"{part}/{c}/{serial:04d}_{d:02d}.png", fake_stroke_png(rng)))
            serial += 1
        if extract:
            for name, data in members:
                p = folder / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            out[part] = folder / part
        else:
            path = folder / f"{part}.zip"
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in members:
                    zf.writestr(name, data)
            out[part] = path
    return out


def fake_miniimagenet(
    folder: Path,
    layout: str = "pickle",
    classes: Optional[Dict[str, int]] = None,
    per_class: int = 6,
    size: int = 84,
    seed: int = 0,
    image_format: str = "png",
    pickle_protocol: int = 4,
) -> Dict[str, Dict[str, np.ndarray]]:
    """Write a fake mini-ImageNet into ``folder`` in ``layout`` "pickle" or "images".

    ``classes``: split -> number of classes (default train 4, val 3, test 3). Returns, per split,
    ``{label: uint8 [per_class, size, size, 3]}`` (the pixels written; JPEG is lossy).
    """
    if layout not in ("pickle", "images"):
        raise ValueError(f"layout: expected 'pickle' or 'images', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = classes or {"train": 4, "val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    truth: Dict[str, Dict[str, np.ndarray]] = {}
    for s_i, (split, n_cls) in enumerate(classes.items()):
        labels = [f"n{s_i:02d}{c:06d}" for c in range(n_cls)]
        imgs = {lab: rng.integers(0, 256, (per_class, size, size, 3), dtype=np.uint8) for lab in labels}
        truth[split] = imgs
        if layout == "pickle":
            data = np.concatenate([imgs[lab] for lab in labels])
            class_dict = {lab: list(range(i * per_class, (i + 1) * per_class)) for i, lab in enumerate(labels)}
            with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=pickle_protocol)
        else:
            (folder / "images").mkdir(exist_ok=True)
            rows: List[Iterable[str]] = [("filename", "label")]
            for lab in labels:
                for j, im in enumerate(imgs[lab]):
                    fn = f"{lab}{j + 1:08d}.{image_format}"
                    Image.fromarray(im).save(folder / "images" / fn)
                    rows.append((fn, lab))
            with open(folder / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return truth
