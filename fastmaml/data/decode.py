"""Image decoding to uint8 arrays, optionally over a pool of worker processes.

Each item is either the encoded bytes of an image or a path to one. Workers run only PIL and
numpy (never torch), and are forked on Linux; elsewhere, or for small jobs, decoding is serial.

Omniglot (``decode_strokes``): the PNGs are black strokes on white, 105x105, 1 bit (PIL mode "1").
Two resizes, both ending in 0/1 pixels, ``stroke = grey < 128`` -> 1, background -> 0:

* ``"lanczos"`` (the default): converted to 8-bit grey first, then resized with PIL's LANCZOS filter
  (an antialiased downscale, so a stroke pixel keeps its area coverage) and binarised at 50%
  coverage. Strokes stay connected and keep their width.
* ``"nearest"``: what the MAML code's ``resize_images.py`` produced. It calls
  ``resize((28, 28), resample=LANCZOS)`` on the 1-bit image as loaded, and PIL resizes a mode-"1"
  image with NEAREST whatever filter is asked (documented in ``Image.resize``): every output pixel
  copies one source pixel, so thin strokes break up or vanish. Converting to grey before a NEAREST
  resize picks the same pixels.

Both keep about the full-resolution stroke fraction (6.4% of pixels; 6.5% lanczos, 6.3% nearest at
28x28 on the first 200 drawings).

Colour images (``decode_rgb``): converted to RGB, resized with LANCZOS when their size differs,
returned channel-first ``[3, H, W]``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import warnings
from typing import Callable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

Item = Union[bytes, str]
STROKE_THRESHOLD = 128  # grey < 128 after resizing -> stroke
RESIZE_METHODS = ("lanczos", "nearest")
_PIL_FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST}


def _open(item: Item) -> Image.Image:
    if isinstance(item, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(item))
    else:
        im = Image.open(item)
    im.load()
    return im


def check_resize(resize: str) -> None:
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize: expected one of {list(RESIZE_METHODS)}, got {resize!r}")


def decode_strokes(items: Sequence[Item], size: Tuple[int, int], resize: str = "lanczos") -> np.ndarray:
    """Omniglot PNGs -> uint8 ``[n, H, W]``, stroke = 1, background = 0; ``resize`` is
    ``"lanczos"`` or ``"nearest"`` (see the module docstring)."""
    check_resize(resize)
    h, w = size
    out = np.empty((len(items), h, w), dtype=np.uint8)
    for i, item in enumerate(items):
        im = _open(item).convert("L")
        if im.size != (w, h):
            im = im.resize((w, h), _PIL_FILTERS[resize])
        out[i] = np.asarray(im) < STROKE_THRESHOLD
    return out


def decode_rgb(items: Sequence[Item], size: Tuple[int, int]) -> np.ndarray:
    """Colour images -> uint8 ``[n, 3, H, W]`` (LANCZOS-resized when the size differs)."""
    h, w = size
    out = np.empty((len(items), 3, h, w), dtype=np.uint8)
    for i, item in enumerate(items):
        im = _open(item).convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.LANCZOS)
        out[i] = np.asarray(im).transpose(2, 0, 1)
    return out


def _call(args):
    fn, items, size, index = args
    try:
        return fn(items, size)
    except Exception as e:  # name the failing item for the caller
        raise DecodeError(index, repr(e)) from None


class DecodeError(Exception):
    """Raised by a worker: chunk ``index`` failed with ``message``."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)
        self.index = index
        self.message = message


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def decode_all(
    fn: Callable[[Sequence[Item], Tuple[int, int]], np.ndarray],
    items: Sequence[Item],
    size: Tuple[int, int],
    num_workers: int = None,
    chunk: int = 512,
    describe: Callable[[int], str] = str,
) -> np.ndarray:
    """Decode ``items`` with ``fn`` in chunks, in order, concatenated along the first axis.

    ``num_workers``: None -> one per core (at most 8); 0 or 1 -> serial. A failing item raises
    ValueError naming it through ``describe(item_index)``.
    """
    n = len(items)
    workers = default_workers() if num_workers is None else int(num_workers)
    chunks = [(fn, list(items[i:i + chunk]), tuple(size), i) for i in range(0, n, chunk)]
    parallel = workers > 1 and len(chunks) > 1 and sys.platform.startswith("linux")
    results: List[np.ndarray] = []
    try:
        if parallel:
            # fork is safe here: the workers run only PIL and numpy, never torch or its threads
            ctx = multiprocessing.get_context("fork")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                pool = ctx.Pool(min(workers, len(chunks)))
            with pool:
                results = list(pool.imap(_call, chunks))
        else:
            results = [_call(c) for c in chunks]
    except DecodeError as e:
        # find the failing item within the chunk, serially, to name it
        start = e.index
        for j, item in enumerate(items[start:start + chunk]):
            try:
                fn([item], tuple(size))
            except Exception as inner:
                raise ValueError(f"cannot decode image {describe(start + j)}: {inner}") from None
        raise ValueError(f"cannot decode images {describe(start)}...: {e.message}") from None
    if not results:
        return fn([], tuple(size))
    return np.concatenate(results, axis=0)
