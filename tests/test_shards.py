"""Tar shards: packing, disjoint streams per rank and worker, exact resume of a stream, corrupt samples."""

import io
import json
import tarfile

import pytest

from snapgen.cli import main
from snapgen.data.scenes import SceneDataset
from snapgen.data.shards import ShardStream, pack_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    pack_shards(SceneDataset(resolution=32, length=50, seed=3), d, shard_size=6, progress=False)
    return d


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_pack_writes_webdataset_layout(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["total"] == 50 and len(index["shards"]) == 9 and index["shards"][-1]["count"] == 2
    with tarfile.open(shards / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
    s = take(ShardStream(shards, shuffle=False), 1)[0]
    ref = SceneDataset(resolution=32, length=50, seed=3)[0]
    assert s.caption == ref.caption and s.image.tobytes() == ref.image.tobytes()


def test_streams_are_disjoint_and_cover_every_sample_once_per_epoch(shards):
    keys = []
    for rank in range(2):
        for worker in range(2):
            st = ShardStream(shards, rank=rank, world=2, worker=worker, workers=2, seed=1)
            order = st._order(0)
            n = sum(json.loads((shards / "index.json").read_text())["shards"][int(o[6:12])]["count"] for o in order)
            keys += [s.meta["key"] for s in take(st, n)]
    assert len(keys) == 50 and len(set(keys)) == 50
    with pytest.raises(ValueError, match="cannot feed"):
        ShardStream(shards, world=5, workers=2)


def test_resumed_stream_neither_repeats_nor_skips(shards):
    whole = [s.meta["key"] for s in take(ShardStream(shards, seed=7), 80)]  # crosses an epoch boundary
    first = ShardStream(shards, seed=7)
    a = [s.meta["key"] for s in take(first, 23)]
    state = json.loads(json.dumps(first.state()))  # as saved in a checkpoint
    second = ShardStream(shards, seed=7)
    second.load_state(state)
    b = [s.meta["key"] for s in take(second, 57)]
    assert a + b == whole
    assert whole[:50] != whole[50:80] + whole[:20]  # epochs are reshuffled


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for key, png, txt in [("a", None, b"a red circle"), ("b", b"not a png", b"x"), ("c", None, b"")]:
            if png is None:
                from PIL import Image

                buf = io.BytesIO()
                Image.new("RGB", (8, 8)).save(buf, format="PNG")
                png = buf.getvalue()
            for ext, data in (("png", png), ("txt", txt)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "count": 3}]}))
    st = ShardStream(tmp_path, shuffle=False)
    got = take(st, 2)
    assert [s.caption for s in got] == ["a red circle", "a red circle"]  # second is the next epoch
    assert st.state()["skipped"] == 2
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardStream(tmp_path / "nothing")


def test_cli_pack(tmp_path, capsys):
    assert main(["data", "pack", "scenes", "--out", str(tmp_path / "s"), "--limit", "10", "--shard-size", "4",
                 "--resolution", "32"]) == 0
    assert "10 samples in 3 shards" in capsys.readouterr().out
