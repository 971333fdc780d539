"""Downloading dataset files: streamed to a temp file beside the target, verified, then renamed.

``OMNIGLOT_URLS`` and ``OMNIGLOT_MD5`` are plain module-level dicts that the loaders read at call
time, so tests (or mirrors) can point them elsewhere, e.g. ``monkeypatch.setitem``.

Guarantees of ``download_url``: the final file appears only after the whole body arrived, its
length matched ``Content-Length`` (when sent) and its MD5 matched (when given); it is fsynced
before the rename. On any failure (wrong MD5, truncated transfer, HTTP error, Ctrl-C) the temp file
is removed and nothing is left under the final name, so a later load cannot mistake a partial
download for a complete one.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from ..fsutil import atomic_write, remove_stale_parts

OMNIGLOT_URLS: Dict[str, str] = {
    "images_background.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}
# The official files' MD5s (see the Omniglot data README).
OMNIGLOT_MD5: Dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}


class DownloadError(OSError):
    """A download failed (network error, HTTP error, truncated transfer); nothing was installed."""


class ChecksumError(DownloadError):
    """A downloaded file's MD5 did not match the expected one; nothing was installed."""


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_url(
    url: str,
    dest: Path,
    md5: Optional[str] = None,
    timeout: float = 60.0,
    progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Fetch ``url`` (http, https or file) into ``dest`` atomically, verifying length and MD5."""
    dest = Path(dest)
    remove_stale_parts(dest.parent, dest.name)
    try:
        with atomic_write(dest) as f:
            h = hashlib.md5(usedforsecurity=False)
            received = 0
            with urllib.request.urlopen(url, timeout=timeout) as r:
                length = r.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                while block := r.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    received += len(block)
                    if progress is not None:
                        progress(received, expected)
            if expected is not None and received != expected:
                raise DownloadError(
                    f"download of {url} was cut short: received {received} of {expected} bytes; "
                    f"nothing was written to {dest}"
                )
            if md5 is not None and h.hexdigest() != md5.lower():
                raise ChecksumError(
                    f"md5 of {url}: expected {md5}, got {h.hexdigest()} ({received} bytes); "
                    f"the file was discarded, nothing was written to {dest}"
                )
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise DownloadError(f"could not download {url} to {dest}: {e}") from e
    return dest


def download_files(
    dest_dir: Path,
    urls: Mapping[str, str],
    md5s: Mapping[str, Optional[str]],
    skip_existing: bool = True,
    timeout: float = 60.0,
) -> Dict[str, Path]:
    """Download each ``name -> url`` into ``dest_dir/name`` (skipping files already there)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, url in urls.items():
        target = dest_dir / name
        if not (skip_existing and target.is_file()):
            download_url(url, target, md5s.get(name), timeout=timeout)
        out[name] = target
    return out


def download_omniglot(dest_dir: Path, names=None, urls: Optional[Mapping[str, str]] = None,
                      md5s: Optional[Mapping[str, Optional[str]]] = None, timeout: float = 60.0) -> Dict[str, Path]:
    """Fetch the official Omniglot zips (``names``: default both) into ``dest_dir``, verifying MD5s.

    ``urls``/``md5s`` default to ``OMNIGLOT_URLS``/``OMNIGLOT_MD5`` as they are at call time.
    """
    urls = dict(OMNIGLOT_URLS if urls is None else urls)
    md5s = dict(OMNIGLOT_MD5 if md5s is None else md5s)
    if names is not None:
        unknown = [n for n in names if n not in urls]
        if unknown:
            raise ValueError(f"names: expected some of {sorted(urls)}, got {unknown}")
        urls = {n: urls[n] for n in names}
    return download_files(dest_dir, urls, md5s, timeout=timeout)
