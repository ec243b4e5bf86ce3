"""WebDataset-style tar shards: pack any snapgen dataset (or an image folder) into ``shard-NNNNNN.tar`` files
of ``{key}.png`` + ``{key}.txt`` (+ ``{key}.json`` metadata), and stream them back with disjoint shards per
rank and data-loader worker and an exact, checkpointable position.

Plain ``tarfile`` and the WebDataset layout (samples = consecutive members sharing a key), so the shards are
readable by ``webdataset`` too. ``index.json`` lists the shards and their sample counts.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .base import Sample

__all__ = ["pack_shards", "ShardStream", "StreamState"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def pack_shards(dataset, out_dir: str | os.PathLike, shard_size: int = 1000, limit: int | None = None,
                progress: bool = True) -> Path:
    """Write ``dataset`` (items with ``.image``, ``.caption``, ``.meta``) into tar shards of ``shard_size``."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    shards = []
    for s, start in enumerate(tqdm(range(0, n, shard_size), desc="packing", disable=not progress)):
        name = f"shard-{s:06d}.tar"
        tmp = out / f".{name}.tmp"
        count = 0
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + shard_size, n)):
                item = dataset[i]
                key = f"{i:09d}"
                buf = io.BytesIO()
                item.image.save(buf, format="PNG")
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.txt", item.caption.encode())
                meta = getattr(item, "meta", None)
                if meta:
                    _add(tar, f"{key}.json", json.dumps(meta, default=str).encode())
                count += 1
        os.replace(tmp, out / name)
        shards.append({"name": name, "count": count})
    (out / "index.json").write_text(json.dumps({"format": "snapgen-shards", "shards": shards,
                                                "total": sum(s["count"] for s in shards)}, indent=2) + "\n")
    return out


@dataclass
class StreamState:
    """Where a stream is: epoch, index into this stream's shard order, samples already read from that shard."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    skipped: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "skipped": self.skipped}


class _ShardCursor:
    """Shard order, stream split and exact position shared by image and latent shard streams.

    Shard ``i`` of an epoch's order (a permutation seeded by ``(seed, epoch)``) belongs to stream
    ``i % (world * workers)``, stream id ``rank * workers + worker``: the streams are disjoint and together
    cover every shard once per epoch. Subclasses read a shard (``_samples``) and decode a sample (``_decode``).
    """

    kind = "shard"

    def __init__(self, directory: str | os.PathLike, rank: int = 0, world: int = 1, worker: int = 0,
                 workers: int = 1, seed: int = 0, shuffle: bool = True):
        self.dir = Path(directory)
        index = self.dir / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{self.dir} has no index.json: not a {self.kind} folder ({self.hint})")
        self.index = json.loads(index.read_text())
        self.shards = [s["name"] for s in self.index["shards"]]
        streams = world * workers
        if len(self.shards) < streams:
            raise ValueError(f"{len(self.shards)} shards cannot feed {streams} streams (ranks x workers); pack "
                             f"with a smaller --shard-size")
        self.stream, self.streams = rank * workers + worker, streams
        self.seed, self.shuffle = seed, shuffle
        self._state = StreamState()

    hint = "write one with `snapgen data pack`"

    def state(self) -> dict:
        return self._state.to_dict()

    def load_state(self, state: dict) -> None:
        self._state = StreamState(int(state["epoch"]), int(state["shard"]), int(state["offset"]),
                                  int(state.get("skipped", 0)))

    def _order(self, epoch: int) -> list[str]:
        names = list(self.shards)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, 31, epoch]).permutation(len(names))
            names = [names[i] for i in perm]
        return names[self.stream::self.streams]

    def _samples(self, path: Path):  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, key: str, parts: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def fetch(self, position: tuple[int, int, int]):
        """The sample at ``(epoch, shard index in that epoch's order, offset)`` (re-reads one shard)."""
        epoch, shard, offset = (int(v) for v in position)
        for i, (key, parts) in enumerate(self._samples(self.dir / self._order(epoch)[shard])):
            if i == offset:
                sample = self._decode(key, parts)
                sample.meta["position"] = (epoch, shard, offset)
                return sample
        raise IndexError(f"no sample at {position} in {self.dir}")

    def __iter__(self):
        """Samples of this stream, epoch after epoch; each carries ``meta['position']`` for :meth:`fetch`."""
        st = self._state
        while True:
            order = self._order(st.epoch)
            while st.shard < len(order):
                for i, (key, parts) in enumerate(self._samples(self.dir / order[st.shard])):
                    if i < st.offset:
                        continue
                    st.offset = i + 1
                    try:
                        sample = self._decode(key, parts)
                    except Exception:  # a broken sample: skip it, count it, go on
                        st.skipped += 1
                        continue
                    sample.meta["position"] = (st.epoch, st.shard, i)
                    yield sample
                st.shard, st.offset = st.shard + 1, 0
            st.epoch, st.shard, st.offset = st.epoch + 1, 0, 0


class ShardStream(_ShardCursor):
    """Iterate the image + caption samples of this (rank, worker)'s tar shards, epoch after epoch.

    ``state()`` / ``load_state(...)`` give the exact position, so a resumed run neither repeats nor skips a
    sample. Corrupt samples (undecodable image, missing caption) are skipped and counted in
    ``state()["skipped"]``.
    """

    kind = "shard"

    def __init__(self, directory: str | os.PathLike, rank: int = 0, world: int = 1, worker: int = 0,
                 workers: int = 1, seed: int = 0, shuffle: bool = True, resolution: int | None = None):
        super().__init__(directory, rank, world, worker, workers, seed, shuffle)
        if self.index.get("format", "snapgen-shards") != "snapgen-shards":
            raise ValueError(f"{self.dir} holds {self.index['format']!r}, not image shards")
        self.resolution = resolution

    def _samples(self, path: Path):
        """(key, {extension: bytes}) per sample of a shard, in order (WebDataset grouping by key)."""
        current, parts = None, {}
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                if key != current and current is not None:
                    yield current, parts
                    parts = {}
                current = key
                parts[ext] = tar.extractfile(m).read()
        if current is not None:
            yield current, parts

    def _decode(self, key: str, parts: dict) -> Sample:
        caption = parts["txt"].decode()
        image = Image.open(io.BytesIO(parts["png"])).convert("RGB")
        if self.resolution and image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.BICUBIC)
        if not caption.strip():
            raise ValueError("empty caption")
        meta = json.loads(parts["json"]) if "json" in parts else {}
        return Sample(image=image, caption=caption, meta={"key": key, **meta})
