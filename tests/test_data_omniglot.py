"""Omniglot: the decode-once cache, splits, rotations, episodes and errors.

Tests marked ``data`` read the real Omniglot through ``FASTMAML_DATA`` (a folder containing
``omniglot/``) and skip without it; they share one cache, built once per session in a temp folder.
The others run on tiny fabricated zips.
"""

import hashlib
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml.data import Omniglot
from fastmaml.data import omniglot_files as of
from fastmaml.data.fabricate import fake_omniglot

SPLITS_DIR = Path(__file__).resolve().parents[1] / "fastmaml" / "data" / "splits" / "vinyals"


def real_omniglot_dir():
    root = os.environ.get("FASTMAML_DATA")
    if not root:
        pytest.skip("FASTMAML_DATA is unset: set it to the folder that contains omniglot/ (e.g. /work/shared/data)")
    d = Path(root) / "omniglot"
    if not all((d / f"{p}.zip").is_file() or (d / p).is_dir() for p in of.PARTS):
        pytest.skip(f"FASTMAML_DATA={root} has no omniglot/images_background.zip and images_evaluation.zip")
    return d


# --------------------------------------------------------------------------------------------
# fabricated data
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    fake_omniglot(tmp_path / "omniglot")
    return tmp_path / "omniglot"


def test_decode_is_inverted_binary_and_ordered(tiny, tmp_path):
    arr, names, info = of.load_characters(tiny, 105, cache_dir=tmp_path / "c", num_workers=1)
    assert names == sorted(names) and len(names) == 5 and arr.shape == (5, 20, 105, 105)
    with zipfile.ZipFile(tiny / "images_background.zip") as zf:
        member = sorted(n for n in zf.namelist() if "/Beta/character01/" in n)[3]
        png = np.asarray(Image.open(zf.open(member)).convert("L"))
    assert np.array_equal(arr[names.index("Beta/character01"), 3], (png == 0).astype(np.uint8))
    small, _, _ = of.load_characters(tiny, 28, cache_dir=tmp_path / "c", num_workers=1)
    assert small.shape == (5, 20, 28, 28) and set(np.unique(small)) <= {0, 1}
    # LANCZOS + 50% threshold keeps the stroke fraction of the full-size images
    assert abs(small.mean() - arr.mean()) < 0.25 * arr.mean()


def test_nearest_resize_is_the_maml_codes_images(tiny, tmp_path):
    """``resize="nearest"`` gives the images the MAML code trained on: its resize_images.py calls
    ``Image.open(png).resize((28, 28), resample=Image.LANCZOS)`` on the 1-bit PNG, which PIL resizes by
    nearest neighbour (strokes = black = 0). That call, written out here, against the loader. The
    default (LANCZOS on grey, binarised) differs from it, and each has its own cache file."""
    cache = tmp_path / "c"
    near, names, info = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1, resize="nearest")
    lanc, names2, info2 = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1)
    assert names == names2 and info["cache_path"] != info2["cache_path"]
    assert info["cache_path"].endswith("omniglot-28x28-nearest.fmcache")
    checked = 0
    for z in sorted(tiny.glob("*.zip")):
        with zipfile.ZipFile(z) as zf:
            for member in sorted(n for n in zf.namelist() if n.endswith(".png")):
                part, alphabet, char, fn = member.split("/")
                im = Image.open(zf.open(member))
                assert im.mode == "1"  # as the Omniglot distribution's PNGs
                want = (np.asarray(im.resize((28, 28), resample=Image.LANCZOS)) == 0).astype(np.uint8)
                drawing = sorted(m for m in zf.namelist() if m.startswith(f"{part}/{alphabet}/{char}/")).index(member)
                assert np.array_equal(near[names.index(f"{alphabet}/{char}"), drawing], want), member
                checked += 1
    assert checked == near.shape[0] * near.shape[1]
    assert not np.array_equal(near, lanc)
    again, _, info3 = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1, resize="nearest")
    assert info3["source"] == "cache" and np.array_equal(again, near)


def test_parallel_decode_and_folders_match_serial_zip(tiny, tmp_path):
    a, na, _ = of.load_characters(tiny, 28, cache_dir=tmp_path / "c1", num_workers=1)
    b, nb, _ = of.load_characters(tiny, 28, cache_dir=tmp_path / "c2", num_workers=2)
    for z in tiny.glob("*.zip"):
        with zipfile.ZipFile(z) as zf:
            zf.extractall(tmp_path / "extracted")
    c, nc, info = of.load_characters(tmp_path / "extracted", 28, cache_dir=tmp_path / "c3", num_workers=1)
    assert na == nb == nc and np.array_equal(a, b) and np.array_equal(a, c)


def test_cache_hit_stale_and_corrupt(tiny, tmp_path):
    cache = tmp_path / "cache"
    a, _, i1 = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1)
    assert i1["source"] == "decoded" and i1["cache_reason"].endswith("missing")
    path = Path(i1["cache_path"])
    b, _, i2 = of.load_characters(tiny, 28, cache_dir=cache)
    assert i2["source"] == "cache" and np.array_equal(a, b)
    assert [p.name for p in cache.iterdir()] == [path.name], "temp files left behind"
    # another size: another file, the first untouched
    _, _, i3 = of.load_characters(tiny, 20, cache_dir=cache, num_workers=1)
    assert i3["source"] == "decoded" and Path(i3["cache_path"]) != path
    # the source zip changes -> stale -> rebuilt
    z = tiny / "images_evaluation.zip"
    st = z.stat()
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, i4 = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1)
    assert i4["source"] == "decoded" and "stale" in i4["cache_reason"]
    # corrupt payload (one byte flipped), truncated file, garbage: each detected and rebuilt
    for damage in ("flip", "truncate", "garbage"):
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-100] ^= 0xFF
        elif damage == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw = bytearray(b"not a cache")
        path.write_bytes(bytes(raw))
        c, _, info = of.load_characters(tiny, 28, cache_dir=cache, num_workers=1)
        assert info["source"] == "decoded" and "corrupt" in info["cache_reason"], (damage, info)
        assert np.array_equal(c, a)
        assert of.load_characters(tiny, 28, cache_dir=cache)[2]["source"] == "cache"


def test_cache_never_goes_into_the_data_folder(tiny, tmp_path, monkeypatch):
    """Issue 13 item 17: a writable data folder is not written either (no permission games)."""
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "home"))
    before = sorted(p.name for p in tiny.iterdir())
    _, _, info = of.load_characters(tiny, 28, num_workers=1)
    assert info["source"] == "decoded" and Path(info["cache_path"]).parent == tmp_path / "home" / "omniglot"
    assert sorted(p.name for p in tiny.iterdir()) == before
    assert of.load_characters(tiny, 28)[2]["source"] == "cache"
    _, _, info = of.load_characters(tiny, 20, num_workers=1)
    assert Path(info["cache_path"]).parent == tmp_path / "home" / "omniglot"
    assert sorted(p.name for p in tiny.iterdir()) == before


def test_rotation_direction_is_counter_clockwise():
    # rotDDD = PIL's Image.rotate(DDD) (counter-clockwise) = torch.rot90(x, DDD // 90, dims=(-2, -1))
    x = np.zeros((5, 5), np.uint8)
    x[0, 1:4] = 255  # a bar along the top edge ...
    x[1, 3] = 255  # ... with a hook at its right end
    for k in (1, 2, 3):
        pil = np.asarray(Image.fromarray(x).rotate(90 * k))
        assert np.array_equal(torch.rot90(torch.from_numpy(x), k, dims=(-2, -1)).numpy(), pil)


def test_bad_input(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'test'\] for split_scheme='maml', got 'val'"):
        Omniglot(tiny, split="val", split_scheme="maml")
    with pytest.raises(ValueError, match=r"split_scheme: expected one of \['maml', 'maml_val', 'vinyals'\], got 'lake'"):
        Omniglot(tiny, split_scheme="lake")
    with pytest.raises(ValueError, match=r"resize: expected one of \['lanczos', 'nearest'\], got 'bicubic'"):
        Omniglot(tiny, resize="bicubic")
    with pytest.raises(ValueError, match="split: expected one of"):
        Omniglot(tiny, split="validation")
    with pytest.raises(FileNotFoundError, match=r"root: Omniglot not found: expected .*images_background\.zip.*FASTMAML_DATA.*download=True"):
        Omniglot(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"root: Omniglot not found: .*empty_cache.*download=True"):
        Omniglot()
    # only one of the two zips
    half = tmp_path / "half" / "omniglot"
    half.mkdir(parents=True)
    shutil.copy(tiny / "images_background.zip", half)
    with pytest.raises(FileNotFoundError, match=r"lacks images_evaluation\.zip"):
        Omniglot(half)
    # a corrupt zip: named, with how to get a good one
    bad = tmp_path / "bad" / "omniglot"
    bad.mkdir(parents=True)
    shutil.copy(tiny / "images_background.zip", bad)
    (bad / "images_evaluation.zip").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=r"images_evaluation\.zip: not a valid Omniglot zip.*download=True.*FASTMAML_DATA"):
        of.load_characters(bad, 28, cache_dir=tmp_path / "c")
    # a member whose bytes are damaged (CRC mismatch)
    raw = bytearray((tiny / "images_background.zip").read_bytes())
    raw[200:260] = b"\x00" * 60
    (bad / "images_background.zip").write_bytes(bytes(raw))
    shutil.copy(tiny / "images_evaluation.zip", bad)
    with pytest.raises(ValueError, match=r"images_background\.zip"):
        of.load_characters(bad, 28, cache_dir=tmp_path / "c")
    # the tiny set lacks the split's characters
    with pytest.raises(ValueError, match=r"lacks .* characters of the vinyals 'train' split"):
        Omniglot(tiny, cache_dir=tmp_path / "c", num_workers=1)
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(tiny, image_size=0)


# --------------------------------------------------------------------------------------------
# the real Omniglot (FASTMAML_DATA)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real data folder and a session cache folder (``<tmp>/omniglot``, also reachable as the
    default cache through FASTMAML_CACHE=<tmp>), built here once."""
    data = real_omniglot_dir()
    home = tmp_path_factory.mktemp("fastmaml_cache")
    cache = home / "omniglot"
    t0 = time.perf_counter()
    arr, names, info = of.load_characters(data, 28, cache_dir=cache)
    build_s = time.perf_counter() - t0
    print(f"\nOmniglot cache built in {build_s:.1f} s ({info['source']})")
    return {"data": data, "home": home, "cache": cache, "chars": arr, "names": names, "build_info": info}


@pytest.mark.data
def test_real_counts(real):
    arr, names = real["chars"], real["names"]
    assert len(names) == 1623 and arr.shape == (1623, 20, 28, 28) and arr.dtype == np.uint8
    assert arr.shape[0] * arr.shape[1] == 32460
    for part, n_chars in (("images_background", 964), ("images_evaluation", 659)):
        src = of.part_source(real["data"], part)
        if src.is_file():
            with zipfile.ZipFile(src) as zf:
                pngs = [n for n in zf.namelist() if n.endswith(".png")]
        else:
            pngs = [str(p) for p in src.rglob("*.png")]
        assert len({p.rsplit("/", 1)[0] for p in pngs}) == n_chars and len(pngs) == 20 * n_chars
    # binary, strokes foreground: a minority of ones
    assert set(np.unique(arr)) == {0, 1}
    frac = arr.mean()
    assert 0.04 < frac < 0.15, frac
    per_image = arr.reshape(32460, -1).mean(1)
    assert (per_image < 0.5).all() and (per_image > 0).all()


@pytest.mark.data
def test_real_cache_round_trip(real, monkeypatch):
    arr, names, info = of.load_characters(real["data"], 28, cache_dir=real["cache"])
    assert info["source"] == "cache" and names == real["names"] and np.array_equal(arr, real["chars"])
    # default placement: the default cache (FASTMAML_CACHE), never the data folder
    monkeypatch.setenv("FASTMAML_CACHE", str(real["home"]))
    before = sorted(p.name for p in real["data"].iterdir())
    ds = Omniglot(real["data"], split="train")  # load time: bench/bench_data.py
    assert ds.load_info["source"] == "cache" and ds.load_info["cache_path"].startswith(str(real["cache"]))
    # the data folder is never written, whatever its permissions (issue 13 item 17)
    assert sorted(p.name for p in real["data"].iterdir()) == before


@pytest.mark.data
def test_real_splits(real, monkeypatch):
    monkeypatch.setenv("FASTMAML_DATA", str(real["data"].parent))
    kw = dict(cache_dir=real["cache"], ways=5)
    sizes = {}
    for split, chars in (("train", 1028), ("val", 172), ("test", 423), ("trainval", 1200)):
        ds = Omniglot(split=split, **kw)
        assert ds.num_classes == 4 * chars and ds.images.shape == (4 * chars, 20, 28, 28)
        assert Omniglot(split=split, rotations=False, **kw).num_classes == chars
        sizes[split] = {n.rsplit("/", 1)[0] for n in ds.class_names}
    assert not sizes["train"] & sizes["val"] and not sizes["train"] & sizes["test"] and not sizes["val"] & sizes["test"]
    assert sizes["trainval"] == sizes["train"] | sizes["val"]
    mtrain = Omniglot(split="train", split_scheme="maml", **kw)
    mtest = Omniglot(split="test", split_scheme="maml", **kw)
    assert mtrain.num_classes == 4800 and mtest.num_classes == 1692
    ctrain = {n.rsplit("/", 1)[0] for n in mtrain.class_names}
    ctest = {n.rsplit("/", 1)[0] for n in mtest.class_names}
    assert len(ctrain) == 1200 and len(ctest) == 423 and not ctrain & ctest and len(ctrain | ctest) == 1623
    # the split is fixed (sha256-keyed shuffle of the names, see fastmaml.data.splits): pinned
    digest = hashlib.sha256("\n".join(sorted(ctest)).encode()).hexdigest()
    assert digest == "7f2b07731dcab08ea90b104aca782995e19882dc64719ea854a0e593b43bd4ef"
    assert Omniglot(split="train", split_scheme="maml", rotations=False, **kw).num_classes == 1200
    # maml_val (the MAML code's): 100 of the 1200 held out for validation, the same 423 for testing
    vparts = {sp: {n.rsplit("/", 1)[0] for n in Omniglot(split=sp, split_scheme="maml_val", **kw).class_names}
              for sp in ("train", "val", "test")}
    assert (len(vparts["train"]), len(vparts["val"])) == (1100, 100) and vparts["test"] == ctest
    assert vparts["train"] | vparts["val"] == ctrain and not vparts["train"] & vparts["val"]


@pytest.mark.data
def test_packaged_vinyals_split_matches_the_distribution(real):
    sums = real["data"] / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip("no SHA256SUMS beside the data")
    want = dict(reversed(line.split()) for line in sums.read_text().splitlines() if "splits/vinyals" in line)
    for name, digest in want.items():
        got = hashlib.sha256((SPLITS_DIR / Path(name).name).read_bytes()).hexdigest()
        assert got == digest, name


@pytest.mark.data
def test_real_rotations(real):
    ds = Omniglot(real["data"], split="val", cache_dir=real["cache"])
    idx = {n: i for i, n in enumerate(ds.class_names)}
    chars = sorted({n.rsplit("/", 1)[0] for n in ds.class_names})
    base = ds.images[[idx[f"{c}/rot000"] for c in chars]]
    row = {n: i for i, n in enumerate(real["names"])}
    assert torch.equal(base, torch.from_numpy(real["chars"][[row[c] for c in chars]]))
    for k in (1, 2, 3):
        rot = ds.images[[idx[f"{c}/rot{90 * k:03d}"] for c in chars]]
        assert torch.equal(rot, torch.rot90(base, k, dims=(-2, -1)))


@pytest.mark.data
@pytest.mark.parametrize("split,ways,shots,queries", [("train", 5, 1, 15), ("test", 20, 5, 15), ("val", 5, 5, 5)])
def test_real_episodes(real, split, ways, shots, queries):
    ds = Omniglot(real["data"], split=split, ways=ways, shots=shots, queries=queries, cache_dir=real["cache"], seed=4)
    e = ds.examples_per_class
    flat = ds.images.flatten(0, 1)
    batches = [ds.sample(16, return_indices=True)] + list(ds.episodes(40, batch=16, seed=1, return_indices=True))
    for sx, sy, qx, qy, si, qi in batches:
        t = sx.shape[0]
        assert sx.shape == (t, ways * shots, 1, 28, 28) and qx.shape == (t, ways * queries, 1, 28, 28)
        assert sx.dtype == qx.dtype == torch.float32 and sy.dtype == qy.dtype == torch.int64
        assert set(torch.unique(qx).tolist()) <= {0.0, 1.0}
        assert torch.equal(sx, flat[si].unsqueeze(2).float()) and torch.equal(qx, flat[qi].unsqueeze(2).float())
        for i in range(t):
            s, q = si[i].tolist(), qi[i].tolist()
            assert len(set(s)) == len(s) and len(set(q)) == len(q) and not set(s) & set(q)
            cls_s = (si[i] // e).view(ways, shots)
            cls_q = (qi[i] // e).view(ways, queries)
            assert (cls_s == cls_s[:, :1]).all() and (cls_q == cls_s[:, :1]).all()
            assert len(set(cls_s[:, 0].tolist())) == ways
            assert torch.equal(sy[i], torch.arange(ways).repeat_interleave(shots))
            assert torch.equal(qy[i], torch.arange(ways).repeat_interleave(queries))


@pytest.mark.data
def test_real_determinism_and_bad_arguments(real):
    kw = dict(cache_dir=real["cache"], split="test")
    a, b = Omniglot(real["data"], seed=3, **kw), Omniglot(real["data"], seed=3, **kw)
    for x, y in zip(a.sample(8, return_indices=True), b.sample(8, return_indices=True)):
        assert torch.equal(x, y)
    state = a.state_dict()
    first = a.sample(8, return_indices=True)[4]
    a.load_state_dict(state)
    assert torch.equal(a.sample(8, return_indices=True)[4], first)
    with pytest.raises(ValueError, match=r"ways: expected at most 1692 .*got 2000"):
        Omniglot(real["data"], ways=2000, **kw)
    with pytest.raises(ValueError, match=r"shots \+ queries: expected at most 20 .*got shots=5 \+ queries=16 = 21"):
        Omniglot(real["data"], shots=5, queries=16, **kw)


def test_maml_val_split_on_names_alone():
    """``maml_val`` cuts the ``maml`` order: train = its first 1100 characters, val = the next 100,
    test = the ``maml`` test; written out from the sha256 order of the module docstring."""
    from fastmaml.data import splits

    names = [f"A{a:02d}/character{c:02d}" for a in range(50) for c in range(1, 34)][:1623]
    order = sorted(names, key=lambda n: hashlib.sha256(f"0/{n}".encode()).hexdigest())
    assert splits.maml_characters(names, "train", "maml_val") == sorted(order[:1100])
    assert splits.maml_characters(names, "val", "maml_val") == sorted(order[1100:1200])
    assert splits.maml_characters(names, "test", "maml_val") == splits.maml_characters(names, "test") == sorted(order[1200:])
    assert splits.maml_characters(names, "train") == sorted(order[:1200])
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'test'\] for split_scheme='maml', got 'val'"):
        splits.maml_characters(names, "val")
