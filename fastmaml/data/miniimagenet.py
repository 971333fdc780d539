"""mini-ImageNet few-shot task distribution (Vinyals et al. 2016; Ravi & Larochelle 2017 split).

``images``: uint8 ``[classes, 600, 3, 84, 84]`` on ``device`` (64 / 16 / 20 classes for
train / val / test). Samples: float32 ``[T, N*K, 3, 84, 84]`` normalised on the device as
``(x / 255 - mean) / std`` with the ImageNet ``mean = (0.485, 0.456, 0.406)`` and
``std = (0.229, 0.224, 0.225)``. Layouts and caching: see ``miniimagenet_files``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import miniimagenet_files
from .omniglot_files import image_hw
from .sampler import TaskSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MiniImageNet(TaskSampler):
    """N-way K-shot mini-ImageNet episodes (``split``: "train" | "val" | "test").

    ``root``: the folder with the pickles or ``images/`` + CSVs, or one containing
    ``miniimagenet/``; None: ``$FASTMAML_DATA/miniimagenet``, then ``~/.cache/fastmaml/miniimagenet``.
    ``image_size``: 84 by default (images of another size are resized with LANCZOS).
    """

    MEAN = IMAGENET_MEAN
    STD = IMAGENET_STD

    def __init__(
        self,
        root=None,
        split: str = "train",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        device="cpu",
        seed: int = 0,
        *,
        image_size=84,
        cache_dir=None,
        num_workers: Optional[int] = None,
    ):
        size = image_hw(image_size)
        self.split = split
        self.root, arr, labels, self.load_info = miniimagenet_files.load_split(
            root, split, size, cache_dir=cache_dir, num_workers=num_workers
        )
        mean = torch.tensor(self.MEAN).view(3, 1, 1)
        std = torch.tensor(self.STD).view(3, 1, 1)
        super().__init__(
            torch.from_numpy(arr), ways, shots, queries, device, seed,
            scale=1.0 / (255.0 * std), shift=-mean / std,
            class_names=labels, name=f"mini-ImageNet split {split!r}",
        )
