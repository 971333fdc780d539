"""mini-ImageNet in both on-disk layouts, with fabricated images (the real ones are not here)."""

import pickle

import numpy as np
import pytest
import torch

from fastmaml.data import MiniImageNet
from fastmaml.data.fabricate import fake_miniimagenet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def expected_images(truth, split):
    labels = sorted(truth[split])
    return torch.from_numpy(np.stack([truth[split][lab] for lab in labels])).permute(0, 1, 4, 2, 3), labels


@pytest.mark.parametrize("layout,protocol", [("pickle", 2), ("pickle", 5), ("images", None)])
def test_layouts_load_exactly(tmp_path, layout, protocol):
    truth = fake_miniimagenet(tmp_path / "data", layout, per_class=6, size=84, pickle_protocol=protocol or 4)
    for split, n_cls in (("train", 4), ("val", 3), ("test", 3)):
        ds = MiniImageNet(tmp_path / "data", split=split, ways=3, shots=2, queries=3, seed=0,
                          cache_dir=tmp_path / "cache", num_workers=1)
        want, labels = expected_images(truth, split)
        assert ds.images.shape == (n_cls, 6, 3, 84, 84) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images, want) and ds.class_names == labels
        sx, sy, qx, qy, si, qi = ds.sample(4, return_indices=True)
        assert sx.shape == (4, 6, 3, 84, 84) and qx.shape == (4, 9, 3, 84, 84) and sx.dtype == torch.float32
        assert sy.shape == (4, 6) and qy.shape == (4, 9)
        raw = ds.images.flatten(0, 1)[qi].float()
        assert torch.allclose(qx, (raw / 255 - MEAN) / STD, atol=1e-5)
        assert all(not set(si[t].tolist()) & set(qi[t].tolist()) for t in range(4))


def test_images_layout_is_cached_and_rebuilt_when_stale(tmp_path):
    fake_miniimagenet(tmp_path / "d", "images", classes={"train": 3}, per_class=5)
    kw = dict(split="train", ways=2, cache_dir=tmp_path / "c", num_workers=1, shots=1, queries=1)
    a = MiniImageNet(tmp_path / "d", **kw)
    assert a.load_info["source"] == "decoded"
    b = MiniImageNet(tmp_path / "d", **kw)
    assert b.load_info["source"] == "cache" and torch.equal(a.images, b.images)
    # an image changes -> stale
    img = sorted((tmp_path / "d" / "images").iterdir())[0]
    from PIL import Image
    Image.fromarray(np.zeros((84, 84, 3), np.uint8)).save(img)
    c = MiniImageNet(tmp_path / "d", **kw)
    assert c.load_info["source"] == "decoded" and "stale" in c.load_info["cache_reason"]
    assert int(c.images[0, 0].sum()) == 0


def test_other_sizes_and_jpeg(tmp_path):
    truth = fake_miniimagenet(tmp_path, "images", classes={"val": 2}, per_class=4, size=100, image_format="jpg")
    ds = MiniImageNet(tmp_path, split="val", ways=2, shots=1, queries=2, cache_dir=tmp_path / "c", num_workers=1)
    assert ds.images.shape == (2, 4, 3, 84, 84)
    small = MiniImageNet(tmp_path, split="val", ways=2, shots=1, queries=2, image_size=32, cache_dir=tmp_path / "c")
    assert small.sample(2)[0].shape == (2, 2, 3, 32, 32)
    assert len(truth["val"]) == 2


def test_root_via_environment(tmp_path, monkeypatch):
    fake_miniimagenet(tmp_path / "miniimagenet", "pickle", classes={"test": 5})
    monkeypatch.setenv("FASTMAML_DATA", str(tmp_path))
    ds = MiniImageNet(split="test", ways=5, shots=1, queries=5)
    assert ds.num_classes == 5 and ds.root == tmp_path / "miniimagenet"


def test_bad_input(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "nocache"))
    with pytest.raises(FileNotFoundError, match=r"root.*mini-imagenet-cache-train\.pkl"):
        MiniImageNet(tmp_path / "missing")
    fake_miniimagenet(tmp_path / "d", "pickle", classes={"train": 4}, per_class=6)
    with pytest.raises(ValueError, match=r"split: expected one of \['train', 'val', 'test'\], got 'trainval'"):
        MiniImageNet(tmp_path / "d", split="trainval")
    with pytest.raises(ValueError, match=r"ways: expected at most 4 .*got 5"):
        MiniImageNet(tmp_path / "d", ways=5)
    with pytest.raises(ValueError, match=r"shots \+ queries: expected at most 6"):
        MiniImageNet(tmp_path / "d", ways=2, shots=2, queries=5)
    # uneven classes
    with open(tmp_path / "d" / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((5, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 1, 2], "b": [3, 4]}}, f)
    with pytest.raises(ValueError, match="same number of images"):
        MiniImageNet(tmp_path / "d", split="val", ways=2, shots=1, queries=1)
    # wrong keys
    with open(tmp_path / "d" / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(ValueError, match="image_data"):
        MiniImageNet(tmp_path / "d", split="test")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        MiniImageNet(tmp_path)
    assert "pwned" not in capsys.readouterr().out
