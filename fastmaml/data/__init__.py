"""Task distributions for meta-learning, sampled on the device in task-batched episodes.

``sample(T)`` of every distribution returns ``(support_x, support_y, query_x, query_y)`` with a
leading task dimension, ready for ``MAML.meta_step``:

* ``Omniglot``: float32 ``[T, N*K, 1, 28, 28]`` (stroke 1.0, background 0.0), labels int64 ``[T, N*K]``;
* ``MiniImageNet``: float32 ``[T, N*K, 3, 84, 84]`` ImageNet-normalised, labels int64;
* ``Sinusoid``: float32 ``[T, K, 1]`` inputs and targets;
* ``TaskSampler``: the generic sampler over any uint8 ``[classes, examples, ...]`` tensor.

Data folders: the ``root`` argument, else ``$FASTMAML_DATA/<dataset>`` (``FASTMAML_DATA`` names
the folder that contains ``omniglot/``), else ``~/.cache/fastmaml/<dataset>``.
"""

from .download import OMNIGLOT_MD5, OMNIGLOT_URLS, ChecksumError, DownloadError, download_omniglot
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .paths import DataNotFound
from .sampler import TaskSampler
from .sinusoid import Sinusoid
from .splits import PackageFileMissing

__all__ = [
    "Omniglot",
    "MiniImageNet",
    "Sinusoid",
    "TaskSampler",
    "DataNotFound",
    "PackageFileMissing",
    "download_omniglot",
    "DownloadError",
    "ChecksumError",
    "OMNIGLOT_URLS",
    "OMNIGLOT_MD5",
]
