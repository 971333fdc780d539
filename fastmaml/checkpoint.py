"""Checkpoints: written atomically, loaded with ``torch.load(..., weights_only=True)``, validated whole.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects)::

    format        "fastmaml-checkpoint"      version     1
    iteration     meta-updates done          config      the run's config (a flat dict)
    model         the model's state_dict     inner_lr    the learner's inner-LR state_dict ({"lr": ...})
    optimizer     the Adam state_dict        rng         {"torch", "cuda", "numpy", "python", "sampler"}
    progress      {"elapsed": seconds of training, "window": sums of the metrics since the last log line}
    device        the device it was trained on (informational)

Writing (:func:`save`): ``torch.save`` into a temporary file in the same folder, flush, fsync,
``os.replace`` onto the final name, fsync the folder. A crash at any point leaves either the previous
checkpoint or the new one, never a mixture; a failed write removes its temporary file.

Loading (:func:`load`): any failure to read (truncated, garbled, not a checkpoint, unsafe pickle)
raises :class:`CheckpointError`; :func:`validate` checks the whole structure before anything of it is
applied, so a bad checkpoint is never half loaded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

from .configs import UserError
from .fsutil import atomic_write

FORMAT = "fastmaml-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"

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

def atomic_write_bytes(path: PathLike, write) -> None:
    """Create ``path`` atomically: ``write(fileobj)`` fills a temporary file ``.<name>.*.tmp`` in the
    same folder, which is flushed, fsynced and renamed over ``path``; the folder is fsynced after."""
    with atomic_write(Path(path), suffix=".tmp") as f:
        write(f)


def save(path: PathLike, checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (see the module docstring)."""
    atomic_write_bytes(path, lambda f: torch.save(dict(checkpoint), f))


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

def load(path: PathLike) -> Dict[str, Any]:
    """Read and validate a checkpoint (on the CPU); :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, unsafe global, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastmaml checkpoint ({first[:200]}); "
                              "it was not loaded") from None
    validate(ckpt, path)
    return ckpt


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
    _need(ckpt["iteration"] >= 0, path, "negative iteration")
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
    _need(isinstance(rng.get("cuda", []), list), path, "CUDA RNG state")


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
