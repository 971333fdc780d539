"""Checkpoints: written atomically, loaded with ``torch.load(..., weights_only=True)``, validated whole.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects)::

    format        "fastmaml-checkpoint"      version     1
    iteration     meta-updates done          config      the run's config (a flat dict)
    model         the model's state_dict     inner_lr    the learner's inner-LR state_dict ({"lr": ...})
    optimizer     the Adam state_dict        rng         {"torch", "cuda", "numpy", "python", "sampler"}
    progress      {"elapsed": seconds of training, "window": sums of the metrics since the last log line,
                   "metrics": metrics.jsonl as written then, {"lines", "bytes", "sha256"} (absent in
                   older checkpoints; see :mod:`fastmaml.app.metrics_file`)}
    device        the device it was trained on (informational)

Writing (:func:`save`): ``torch.save`` into a temporary file in the same folder, flush, fsync,
``os.replace`` onto the final name, fsync the folder. A crash at any point leaves either the previous
checkpoint or the new one, never a mixture; a failed write removes its temporary file.

With ``keep_previous=True`` (what training does) the checkpoint being replaced is kept as
``checkpoint.prev.pt`` first (a hard link renamed into place, so ``checkpoint.pt`` exists at every
moment).

Loading (:func:`load`): the zip's CRC-32 of every member is verified first (``torch.load`` does not
check it: a flipped byte inside tensor data would load silently); any failure to read (damaged,
truncated, garbled, not a checkpoint, unsafe pickle) raises :class:`CheckpointError` naming the
file; :func:`validate` then checks the whole structure, the RNG states (each one is tried on a
scratch generator), the iteration's range and that every weight is finite, before anything of it is
applied, so a bad checkpoint is never half loaded. :func:`load_latest` falls back to
``checkpoint.prev.pt`` when the latest checkpoint is damaged, and says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..fsutil import atomic_write
from . import metrics_file
from .errors import UserError

FORMAT = "fastmaml-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"
PREV_FILENAME = "checkpoint.prev.pt"

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not hold what it should."""


# -- RNG states as tensors ---------------------------------------------------------------------------

def python_rng_state() -> Dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next}


def set_python_rng_state(s: Mapping[str, Any]) -> None:
    random.setstate((int(s["version"]), tuple(int(v) for v in s["state"].tolist()), s["gauss_next"]))


def numpy_rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(s: Mapping[str, Any]) -> None:
    keys = s["keys"].numpy().astype(np.uint32)
    np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))


def capture_rng(sampler_state: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Every RNG state: torch (CPU and each CUDA device), numpy, Python ``random`` and the sampler's."""
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [t.clone() for t in torch.cuda.get_rng_state_all()]
    return {"torch": torch.get_rng_state().clone(), "cuda": cuda, "numpy": numpy_rng_state(),
            "python": python_rng_state(), "sampler": dict(sampler_state) if sampler_state is not None else {}}


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Set torch, CUDA, numpy and Python RNGs from ``capture_rng`` (the sampler's is restored by its
    owner)."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    set_numpy_rng_state(rng["numpy"])
    set_python_rng_state(rng["python"])


# -- atomic writing ----------------------------------------------------------------------------------

def atomic_write_bytes(path: PathLike, write, make_parent: bool = True) -> None:
    """Create ``path`` atomically: ``write(fileobj)`` fills a temporary file ``.<name>.*.tmp`` in the
    same folder, which is flushed, fsynced and renamed over ``path``; the folder is fsynced after
    (``make_parent``: create the folder when missing)."""
    with atomic_write(Path(path), suffix=".tmp", make_parent=make_parent) as f:
        write(f)


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.prev.pt`` beside it."""
    path = Path(path)
    if path.name == FILENAME:
        return path.with_name(PREV_FILENAME)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def keep_as_previous(path: PathLike) -> None:
    """Make ``previous_path(path)`` a copy of ``path`` atomically (a hard link renamed into place, or a
    copy where links are not supported); ``path`` itself is not touched."""
    path = Path(path)
    prev = previous_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{prev.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, prev)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(path: PathLike, checkpoint: Mapping[str, Any], keep_previous: bool = False) -> None:
    """Write ``checkpoint`` to ``path`` atomically (see the module docstring); with ``keep_previous``
    the checkpoint it replaces becomes ``checkpoint.prev.pt`` first. The folder must exist (a run
    folder deleted meanwhile is not recreated holding a checkpoint alone)."""
    if keep_previous and Path(path).is_file():
        keep_as_previous(path)
    atomic_write_bytes(path, lambda f: torch.save(dict(checkpoint), f), make_parent=False)


def remove_stale_temporaries(folder: PathLike, name: str = FILENAME) -> None:
    """Delete temporary files a killed writer left behind (``.checkpoint.pt.*.tmp``)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, entry))
            except OSError:
                pass


# -- loading and validation --------------------------------------------------------------------------

def verify_integrity(path: PathLike) -> None:
    """Check the CRC-32 of every member of the checkpoint's zip; :class:`CheckpointError` if one differs."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastmaml checkpoint (not a readable zip: "
                              f"{first[:200]}); it was not loaded") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the CRC of its member {bad} does not match "
                              "(the file was damaged after it was written); it was not loaded")


def load(path: PathLike) -> Dict[str, Any]:
    """Read and validate a checkpoint (on the CPU); :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint file (a folder?); it was not loaded")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    verify_integrity(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, unsafe global, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastmaml checkpoint ({first[:200]}); "
                              "it was not loaded") from None
    validate(ckpt, path)
    return ckpt


def load_latest(path: PathLike) -> Tuple[Dict[str, Any], Path, Optional[str]]:
    """(checkpoint, the file it came from, a note or None): ``path``, or when it is damaged or
    missing the previous checkpoint ``checkpoint.prev.pt`` with a note saying so."""
    path = Path(path)
    try:
        return load(path), path, None
    except CheckpointError as e:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            ckpt = load(prev)
        except CheckpointError as e2:
            raise CheckpointError(f"{e}; the previous checkpoint is unusable too: {e2}") from None
        reason = str(e).replace(" it was not loaded", "").rstrip(";")
        note = (f"{reason}; using the previous checkpoint {prev} (iteration {ckpt['iteration']}) instead")
        return ckpt, prev, note


def _need(cond: bool, path: PathLike, what: str) -> None:
    if not cond:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {what}; it was not loaded")


def validate(ckpt: Any, path: PathLike = "<checkpoint>") -> None:
    """Check the structure of a loaded checkpoint (every part, before any of it is used)."""
    _need(isinstance(ckpt, dict), path, "not a dict")
    _need(ckpt.get("format") == FORMAT, path, f"format is {ckpt.get('format')!r}, expected {FORMAT!r}")
    _need(ckpt.get("version") == VERSION, path, f"version {ckpt.get('version')!r}, this fastmaml reads {VERSION}")
    for key, kind in (("iteration", int), ("config", dict), ("model", dict), ("inner_lr", dict),
                      ("optimizer", dict), ("rng", dict), ("progress", dict)):
        _need(isinstance(ckpt.get(key), kind), path, f"{key!r} missing or not a {kind.__name__}")
    _need(not isinstance(ckpt["iteration"], bool) and ckpt["iteration"] >= 0, path, "negative iteration")
    planned = ckpt["config"].get("iterations")
    if isinstance(planned, int) and not isinstance(planned, bool):
        _need(ckpt["iteration"] <= planned, path,
              f"iteration {ckpt['iteration']} is beyond the run's {planned} iterations")
    _need(all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()), path, "model state holds non-tensors")
    _need(all(isinstance(v, torch.Tensor) for v in ckpt["inner_lr"].values()), path, "inner_lr state holds non-tensors")
    opt = ckpt["optimizer"]
    _need(isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list), path,
          "optimizer state malformed")
    prog = ckpt["progress"]
    window = prog.get("window")
    _need(isinstance(prog.get("elapsed"), (int, float)) and isinstance(window, dict)
          and all(isinstance(window.get(k), (int, float)) for k in ("loss", "accuracy", "count")), path,
          "progress state malformed")
    rng = ckpt["rng"]
    _need(isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
          and rng["torch"].shape == torch.get_rng_state().shape, path, "torch RNG state")
    np_state = rng.get("numpy")
    _need(isinstance(np_state, dict) and isinstance(np_state.get("keys"), torch.Tensor)
          and np_state["keys"].numel() == 624, path, "numpy RNG state")
    py_state = rng.get("python")
    _need(isinstance(py_state, dict) and isinstance(py_state.get("state"), torch.Tensor)
          and py_state["state"].numel() == 625 and py_state.get("version") == random.getstate()[0]
          and (py_state.get("gauss_next") is None or isinstance(py_state.get("gauss_next"), float)),
          path, "Python RNG state")
    _need(isinstance(rng.get("sampler"), dict), path, "sampler state")
    _need("metrics" not in prog or metrics_file.check_record(prog["metrics"]), path, "progress metrics record")
    cuda = rng.get("cuda", [])
    _need(isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda),
          path, "CUDA RNG state")
    _check_rng_states(rng, path)
    _need(math.isfinite(prog["elapsed"]) and prog["elapsed"] >= 0
          and all(math.isfinite(window[k]) for k in ("loss", "accuracy", "count")), path,
          "progress state holds non-finite or negative numbers")
    for what in ("model", "inner_lr"):
        for k, v in ckpt[what].items():
            if v.is_floating_point() or v.is_complex():
                _need(bool(torch.isfinite(v).all()), path, f"{what} tensor {k} holds NaN or Inf values")
    for pid, entry in opt["state"].items():
        if isinstance(entry, dict):
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    _need(bool(torch.isfinite(v).all()), path, f"optimizer state {k} holds NaN or Inf values")


def _check_rng_states(rng: Mapping[str, Any], path: PathLike) -> None:
    """Each RNG state is set on a scratch generator: a state that would not restore is refused here,
    before anything of the checkpoint is applied (the global generators are not touched)."""
    try:
        torch.Generator().set_state(rng["torch"])
    except (RuntimeError, ValueError, TypeError) as e:
        _need(False, path, f"torch RNG state ({_short(e)})")
    try:
        np_state = rng["numpy"]
        keys = np_state["keys"]
        _need(keys.dtype == torch.int64 and bool(((keys >= 0) & (keys < 2**32)).all()), path,
              "numpy RNG state (keys out of range)")
        np.random.RandomState().set_state((np_state["name"], keys.numpy().astype(np.uint32), int(np_state["pos"]),
                                           int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
        _need(0 <= int(np_state["pos"]) <= 624, path, "numpy RNG state (position out of range)")
    except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as e:
        _need(False, path, f"numpy RNG state ({_short(e)})")
    try:
        py = rng["python"]
        values = py["state"].tolist()
        _need(all(0 <= v < 2**32 for v in values[:-1]) and 0 <= values[-1] <= 624, path,
              "Python RNG state (values out of range)")
        random.Random().setstate((int(py["version"]), tuple(int(v) for v in values), py["gauss_next"]))
    except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as e:
        _need(False, path, f"Python RNG state ({_short(e)})")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:120]


def check_compatible(ckpt: Mapping[str, Any], model: torch.nn.Module, inner_lr: torch.nn.Module,
                     path: PathLike = "<checkpoint>") -> None:
    """The checkpoint's tensors fit ``model`` and ``inner_lr`` exactly (names and shapes)."""
    for what, state, module in (("model", ckpt["model"], model), ("inner_lr", ckpt["inner_lr"], inner_lr)):
        want = module.state_dict()
        missing = [k for k in want if k not in state]
        extra = [k for k in state if k not in want]
        _need(not missing and not extra, path, f"{what} keys differ (missing {missing}, unexpected {extra})")
        for k, v in want.items():
            _need(tuple(state[k].shape) == tuple(v.shape) and state[k].dtype == v.dtype, path,
                  f"{what} tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, expected {tuple(v.shape)} {v.dtype}")


def check_optimizer(ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer, path: PathLike = "<checkpoint>") -> None:
    """The checkpoint's optimizer state fits ``optimizer``: the same parameter groups and, for every
    parameter with state, tensors of its shape."""
    saved = ckpt["optimizer"]
    groups = optimizer.param_groups
    _need(len(saved["param_groups"]) == len(groups), path,
          f"optimizer has {len(saved['param_groups'])} parameter groups, expected {len(groups)}")
    params = []
    for sg, g in zip(saved["param_groups"], groups):
        _need(isinstance(sg, dict) and isinstance(sg.get("params"), list) and len(sg["params"]) == len(g["params"]),
              path, "optimizer parameter groups differ from the model's")
        params += list(zip(sg["params"], g["params"]))
    state = saved["state"]
    for saved_id, p in params:
        entry = state.get(saved_id)
        if entry is None:
            continue
        _need(isinstance(entry, dict), path, "optimizer state malformed")
        for k, v in entry.items():
            _need(isinstance(v, torch.Tensor), path, f"optimizer state {k} is not a tensor")
            if v.dim() > 0:
                _need(v.shape == p.shape, path, f"optimizer state {k} is {tuple(v.shape)}, expected {tuple(p.shape)}")
