"""What a run folder remembers besides its config: the data folder it trained on (``run.json``).

``fastmaml train`` writes ``RUN_DIR/run.json`` = ``{"data": FOLDER}`` when the run reads a data set
from disk (Omniglot, mini-ImageNet; not sinusoid), FOLDER being the data folder as the user named it
(``--data DIR`` or ``$FASTMAML_DATA``: the folder holding ``omniglot/``, made absolute), so that
``fastmaml eval RUN_DIR`` and ``fastmaml train ... --resume`` find the same data without ``--data``.
An explicit ``--data`` still wins. Run folders written before this file existed have none, and
behave as before (``--data``, else ``$FASTMAML_DATA``, else ``~/.cache/fastmaml``); the checkpoint
format is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..fsutil import atomic_write
from .errors import UserError

FILENAME = "run.json"


def user_data_folder(given: Optional[str], dataset_root: Optional[Path], dataset: str) -> Optional[str]:
    """The data folder to remember and to print in a resume command: ``given`` (``--data``) as the
    user typed it, made absolute; else the folder holding the data set's own folder ``dataset_root``
    (``$FASTMAML_DATA`` or the default cache folder); None when nothing was read from disk."""
    if given is not None:
        return os.path.abspath(os.path.expanduser(given))
    if dataset_root is None:
        return None
    root = Path(os.path.abspath(dataset_root))
    return str(root.parent if root.name == dataset else root)


def record(run_dir: Path, data_folder: str) -> None:
    """Write ``run.json`` atomically."""
    text = json.dumps({"data": data_folder}, indent=2) + "\n"
    with atomic_write(run_dir / FILENAME, suffix=".tmp") as f:
        f.write(text.encode())


def data_folder(run_dir: Path) -> Optional[str]:
    """The data folder ``run_dir`` trained on, or None when it remembers none (no ``run.json``: a
    sinusoid run, or one written by an older fastmaml). A damaged file is an error, not a guess."""
    path = Path(run_dir) / FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; pass --data DIR (the folder holding the "
                        "data set) to choose the data yourself") from None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    folder = info.get("data") if isinstance(info, dict) else None
    if not isinstance(folder, str) or not folder:
        raise UserError(f"{path} is damaged (expected {{\"data\": \"FOLDER\"}}, the data folder this run "
                        "trained on); pass --data DIR to choose the data folder, or delete the file")
    return folder


def with_data_origin(error: UserError, folder: str, run_dir: Path) -> UserError:
    """``error`` (about the data) saying that ``folder`` came from the run folder's memory."""
    return UserError(f"{error} (the data folder {folder} is the one {run_dir} trained on, from "
                     f"{Path(run_dir) / FILENAME}; --data DIR reads another)")
