"""Omniglot few-shot task distribution (Lake et al. 2015), as used by MAML.

``Omniglot(...)`` resolves the data folder (``root`` / ``$FASTMAML_DATA/omniglot`` / the default
cache, see ``paths``), optionally downloads the official zips (``download=True``), loads all 1623
characters x 20 drawings as one uint8 array through the decode-once cache
(``omniglot_files.load_characters``), selects the split's classes and puts them on ``device`` as
``images``: uint8 ``[num_classes, 20, H, W]``, values 0/1 with the strokes = 1 (the PNGs' black
strokes on white, inverted). A class is a character at one rotation: ``rotDDD`` is the character
turned counter-clockwise by DDD degrees, ``torch.rot90(x, DDD // 90, dims=(-2, -1))``.

Samples are float32 ``[T, N*K, 1, H, W]`` with stroke = 1.0, background = 0.0.

Tasks pick N distinct classes by default, so a task may hold one character at two rotations (0.6 %
of 5-way training tasks over 1,200 characters, 11 % of 20-way ones; 29 % of 20-way tasks over the 423
test characters). The MAML code picks N distinct *characters* and turns each by its own random
multiple of 90 degrees (``task_rotations="character"``, for training tasks and evaluation episodes
alike); with ``task_pool`` the training tasks keep each pooled task's characters and drawings and
redraw the rotations every time, as the code does.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import decode, omniglot_files, splits
from .sampler import TaskSampler, check_int, sample_without_replacement


class Omniglot(TaskSampler):
    """N-way K-shot Omniglot episodes.

    Args:
        root: the Omniglot folder (holding the two zips or their extracted folders) or a folder
            containing ``omniglot/``; None: ``$FASTMAML_DATA/omniglot``, then ``~/.cache/fastmaml/omniglot``.
        split: ``"train" | "val" | "test" | "trainval"`` (vinyals), ``"train" | "test"`` (maml) or
            ``"train" | "val" | "test"`` (maml_val).
        ways, shots, queries: N, K and Q (queries per class).
        image_size: output side (or (H, W)); 28 as in the MAML paper; 105 keeps the originals.
        split_scheme: ``"vinyals"``, ``"maml"`` or ``"maml_val"`` (see ``splits``).
        rotations: each character at 0/90/180/270 degrees as 4 classes (False: 0 degrees only).
        device: where ``images`` lives and episodes are made.
        download: fetch the official zips (MD5-verified) when not found.
        seed: seed of the training generator.
        cache_dir: folder for the decoded-image cache (default: ``$FASTMAML_CACHE/omniglot``, else
            ``~/.cache/fastmaml/omniglot``; the data folder is never written).
        num_workers: decoding processes on a cache miss (None: one per core).
        resize: ``"lanczos"`` (antialiased, the default) or ``"nearest"`` (the images the MAML code
            trained on); see ``decode``.
        task_rotations: tasks (training and evaluation) of N distinct classes (``"class"``, the
            default) or of N distinct characters, each at its own random rotation (``"character"``,
            the MAML code's).
        task_pool: 0 (a fresh training task every time) or P: P training tasks drawn up front and
            cycled in order (the MAML code: 200,000); see ``sampler``.
    """

    TASK_ROTATIONS = ("class", "character")

    def __init__(
        self,
        root=None,
        split: str = "train",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        image_size=28,
        split_scheme: str = "vinyals",
        rotations: bool = True,
        device="cpu",
        download: bool = False,
        seed: int = 0,
        *,
        cache_dir=None,
        num_workers: Optional[int] = None,
        resize: str = "lanczos",
        task_rotations: str = "class",
        task_pool: int = 0,
    ):
        splits.check_split(split_scheme, split)
        if task_rotations not in self.TASK_ROTATIONS:
            raise ValueError(f"task_rotations: expected one of {', '.join(self.TASK_ROTATIONS)}, got {task_rotations!r}")
        self.task_rotations = task_rotations
        decode.check_resize(resize)
        self.resize = resize
        self.split = split
        self.split_scheme = split_scheme
        self.rotations = bool(rotations)
        h, w = omniglot_files.image_hw(image_size)
        if self.rotations and h != w:
            raise ValueError(f"image_size: rotations need square images, got (height, width) = ({h}, {w})")
        # cheap argument checks first, before any download or decoding
        ways, shots, queries = check_int("ways", ways, 1), check_int("shots", shots, 1), check_int("queries", queries, 0)
        if shots + queries > omniglot_files.DRAWINGS:
            raise ValueError(
                f"shots + queries: expected at most {omniglot_files.DRAWINGS} (the drawings per Omniglot "
                f"character), got shots={shots} + queries={queries} = {shots + queries}"
            )
        class_names = splits.vinyals_classes(split, self.rotations) if split_scheme == "vinyals" else None
        if class_names is not None and ways > len(class_names):
            raise ValueError(
                f"ways: expected at most {len(class_names)} (the number of classes in the Omniglot vinyals "
                f"split {split!r}{'' if self.rotations else ' without rotations'}), got {ways}"
            )
        self.root = omniglot_files.find_data_dir(root, download)
        chars, char_names, self.load_info = omniglot_files.load_characters(
            self.root, image_size, cache_dir=cache_dir, num_workers=num_workers, resize=resize
        )
        if class_names is None:
            class_names = splits.with_rotations(splits.maml_characters(char_names, split, split_scheme),
                                                self.rotations)
        row = {n: i for i, n in enumerate(char_names)}
        rows, turns, missing = [], [], []
        for name in class_names:
            char, k = splits.parse_class(name)
            if char not in row:
                missing.append(char)
                continue
            rows.append(row[char])
            turns.append(k)
        if missing:
            missing = list(dict.fromkeys(missing))
            raise ValueError(
                f"root: the Omniglot data in {self.root} lacks {len(missing)} characters of the "
                f"{split_scheme} {split!r} split, e.g. {missing[:3]}; expected the full 1623-character distribution"
            )
        uniq = sorted(set(rows))
        at = {r: i for i, r in enumerate(uniq)}
        base = torch.from_numpy(chars)[torch.tensor(uniq, dtype=torch.long)]  # [split chars, 20, H, W]
        used = sorted(set(turns))
        slot = {k: i for i, k in enumerate(used)}
        turned = torch.stack([torch.rot90(base, k, dims=(-2, -1)) for k in used])  # [turns, chars, 20, H, W]
        pick = torch.tensor([slot[k] * len(uniq) + at[r] for k, r in zip(turns, rows)], dtype=torch.long)
        images = turned.flatten(0, 1).index_select(0, pick)
        # class_at[turn slot, character] -> class index, for tasks drawn by character
        class_at = torch.full((len(used), len(uniq)), -1, dtype=torch.long)
        for c, (k, r) in enumerate(zip(turns, rows)):
            class_at[slot[k], at[r]] = c
        if task_rotations == "character" and bool((class_at < 0).any()):
            raise ValueError(f"task_rotations: 'character' needs every character of the {split_scheme} {split!r} split "
                             f"at all of its rotations {used}; some are missing")
        if task_rotations == "character" and ways > len(uniq):
            raise ValueError(f"ways: task_rotations='character' needs at most {len(uniq)} (the characters of the "
                             f"{split_scheme} {split!r} split), got {ways}")
        h, w = images.shape[-2:]
        super().__init__(
            images, ways, shots, queries, device, seed,
            item_shape=(1, h, w), class_names=class_names,
            name=f"Omniglot {split_scheme} split {split!r}" + ("" if self.rotations else " without rotations"),
            task_pool=task_pool,
        )
        self._class_at = class_at.to(self.device)

    def _draw_kept(self, num_tasks, generator, device):
        if self.task_rotations == "class":
            return super()._draw_kept(num_tasks, generator, device)
        # the code's tasks: N distinct characters (their turns drawn in _finish_task)
        chars = sample_without_replacement((num_tasks,), self._class_at.shape[1], self.ways, generator, device)
        examples = sample_without_replacement(
            (num_tasks, self.ways), self.examples_per_class, self.shots + self.queries, generator, device
        )
        return chars, examples

    def _finish_task(self, kept, generator):
        if self.task_rotations == "class":
            return super()._finish_task(kept, generator)
        chars, examples = kept
        turns = torch.randint(0, self._class_at.shape[0], chars.shape, generator=generator, device=chars.device)
        return self._class_at[turns, chars], examples
