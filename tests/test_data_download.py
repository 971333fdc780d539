"""Downloads: verified, atomic, and nothing left behind on failure.

Files are served from a loopback HTTP server (127.0.0.1 only) or file:// URLs, with the URL and
MD5 tables patched; the payloads are tiny fabricated Omniglot zips, except one test (marked
``data``) that serves the real 9 MB zip.
"""

import hashlib
import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest

from fastmaml.data import ChecksumError, DownloadError, Omniglot, download
from fastmaml.data.fabricate import fake_omniglot
from fastmaml.data.splits import vinyals_classes


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Server:
    """Serves ``files`` (name -> bytes) at /ok/<name>, cut in half at /cut/<name>, 404 elsewhere."""

    def __init__(self, files):
        self.files = files
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                _, mode, name = (self.path.split("/", 2) + ["", ""])[:3]
                data = outer.files.get(name)
                if data is None or mode not in ("ok", "cut"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(data)
                else:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, mode, name):
        return f"{self.base}/{mode}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_zips(tmp_path_factory):
    """Fake Omniglot zips holding exactly the Vinyals 'val' characters (+1 evaluation character)."""
    d = tmp_path_factory.mktemp("fake_omniglot")
    val_chars = [c.rsplit("/", 1)[0] for c in vinyals_classes("val", rotations=False)]
    fake_omniglot(d, background=val_chars, evaluation=["Zeta/character01"], seed=1)
    return {p.name: p.read_bytes() for p in d.glob("*.zip")}


@pytest.fixture
def server(fake_zips):
    s = Server(dict(fake_zips))
    yield s
    s.close()


def listing(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_url_ok(tmp_path, server, fake_zips):
    data = fake_zips["images_background.zip"]
    out = download.download_url(server.url("ok", "images_background.zip"), tmp_path / "x.zip", md5(data))
    assert out.read_bytes() == data and listing(tmp_path) == ["x.zip"]


def test_wrong_md5_is_refused_and_nothing_left(tmp_path, server):
    with pytest.raises(ChecksumError, match="md5 .* expected 0+, got"):
        download.download_url(server.url("ok", "images_background.zip"), tmp_path / "x.zip", "0" * 32)
    assert listing(tmp_path) == []


def test_truncated_transfer_leaves_nothing(tmp_path, server):
    with pytest.raises(DownloadError, match="cut short"):
        download.download_url(server.url("cut", "images_background.zip"), tmp_path / "x.zip")
    assert listing(tmp_path) == []


def test_http_error_leaves_nothing(tmp_path, server):
    with pytest.raises(DownloadError, match="404"):
        download.download_url(server.url("ok", "nope.zip"), tmp_path / "x.zip")
    assert listing(tmp_path) == []


def test_failed_download_keeps_existing_file(tmp_path, server):
    (tmp_path / "x.zip").write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download.download_url(server.url("ok", "images_background.zip"), tmp_path / "x.zip", "f" * 32)
    assert (tmp_path / "x.zip").read_bytes() == b"old" and listing(tmp_path) == ["x.zip"]


def test_file_url(tmp_path, fake_zips):
    src = tmp_path / "src.zip"
    src.write_bytes(fake_zips["images_evaluation.zip"])
    out = download.download_url(src.as_uri(), tmp_path / "dst" / "e.zip", md5(src.read_bytes()))
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumError):
        download.download_url(src.as_uri(), tmp_path / "dst2" / "e.zip", "1" * 32)
    assert listing(tmp_path / "dst2") == []


def patch_tables(monkeypatch, server, fake_zips, mode="ok"):
    for name, data in fake_zips.items():
        monkeypatch.setitem(download.OMNIGLOT_URLS, name, server.url(mode, name))
        monkeypatch.setitem(download.OMNIGLOT_MD5, name, md5(data))


def test_omniglot_download_end_to_end(tmp_path, monkeypatch, server, fake_zips):
    patch_tables(monkeypatch, server, fake_zips)
    ds = Omniglot(tmp_path / "data", split="val", download=True, cache_dir=tmp_path / "cache", num_workers=1)
    assert listing(tmp_path / "data" / "omniglot") == ["images_background.zip", "images_evaluation.zip"]
    assert ds.num_classes == 688 and ds.images.shape == (688, 20, 28, 28)
    n = len(server.requests)
    again = Omniglot(tmp_path / "data", split="val", download=True, cache_dir=tmp_path / "cache")
    assert len(server.requests) == n, "files already present were downloaded again"
    assert again.load_info["source"] == "cache"


def test_omniglot_download_to_default_cache(tmp_path, monkeypatch, server, fake_zips):
    patch_tables(monkeypatch, server, fake_zips)
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "home_cache"))
    ds = Omniglot(split="val", download=True, num_workers=1, ways=20, shots=5, queries=15)
    assert ds.root == tmp_path / "home_cache" / "omniglot"
    assert "images_background.zip" in listing(ds.root)


def test_interrupted_omniglot_download_is_not_taken_for_complete(tmp_path, monkeypatch, server, fake_zips):
    patch_tables(monkeypatch, server, fake_zips, mode="cut")
    with pytest.raises(DownloadError):
        Omniglot(tmp_path, split="val", download=True)
    assert listing(tmp_path / "omniglot") == []
    with pytest.raises(FileNotFoundError, match="download=True"):
        Omniglot(tmp_path, split="val")
    # a corrupted copy served with a matching md5 is installed, but then refused with the file named
    bad = b"PK\x03\x04 this is not a zip"
    server.files["images_background.zip"] = bad
    patch_tables(monkeypatch, server, {"images_background.zip": bad, "images_evaluation.zip": fake_zips["images_evaluation.zip"]})
    with pytest.raises(ValueError, match=r"images_background\.zip: not a valid Omniglot zip.*download=True.*FASTMAML_DATA"):
        Omniglot(tmp_path, split="val", download=True, cache_dir=tmp_path / "c")


@pytest.mark.data
def test_real_zip_over_loopback(tmp_path, monkeypatch):
    root = os.environ.get("FASTMAML_DATA")
    src = Path(root or "/nonexistent") / "omniglot" / "images_evaluation.zip"
    if not src.is_file():
        pytest.skip("FASTMAML_DATA is unset or has no omniglot/images_evaluation.zip")
    data = src.read_bytes()
    s = Server({"images_evaluation.zip": data})
    try:
        # the official MD5 would not match this recompressed copy: swap in the copy's own
        monkeypatch.setitem(download.OMNIGLOT_URLS, "images_evaluation.zip", s.url("ok", "images_evaluation.zip"))
        monkeypatch.setitem(download.OMNIGLOT_MD5, "images_evaluation.zip", md5(data))
        out = download.download_omniglot(tmp_path, names=["images_evaluation.zip"])
    finally:
        s.close()
    path = out["images_evaluation.zip"]
    assert path.read_bytes() == data
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert sum(n.endswith(".png") for n in zf.namelist()) == 13180
