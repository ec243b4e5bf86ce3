"""Latent shards: image shards encoded once (VAE latents + text-encoder features), streamed at scale.

A large run should not re-encode every image and caption each epoch. ``snapgen data encode`` turns the tar
shards of ``snapgen data pack`` into ``latent-NNNNNN.safetensors`` shards (one per image shard, same sample
order), each holding per sample ``{i}.latent`` (C, h, w) float32, ``{i}.text`` (L_i, D) float16 and
``{i}.mask`` (L_i,) bool -- the caption's features trimmed to its own length -- plus the keys and captions
in the file's metadata. Several text encoders: ``{i}.text_{k}`` / ``{i}.mask_{k}`` per encoder ``k`` instead, and
``text_dims`` / ``text_encoders`` (``{"spec", "max_length", "dim"}`` per encoder) in ``index.json`` (one
encoder: the format above, unchanged). With aspect buckets every image is centre-cropped and resized to the bucket of
its nearest aspect ratio first, so a shard mixes latent grids.

:class:`LatentShardStream` streams them exactly like :class:`~snapgen.data.shards.ShardStream` (disjoint
shards per rank and worker, checkpointable position, unreadable samples skipped and counted), and
:class:`BucketBatcher` deals batches of a single latent grid (one bucket) from a stream, its not-yet-full
buckets included in its checkpointable state, so a resumed run neither repeats nor skips a sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .shards import ShardStream, _ShardCursor

__all__ = ["encode_shards", "LatentSample", "LatentShardStream", "BucketBatcher", "collate_latents",
           "collate_features"]

FORMAT = "snapgen-latent-shards"


@dataclass
class LatentSample:
    latent: torch.Tensor          # (C, h, w) float32, normalised as the autoencoder's encode_latents gives
    text: torch.Tensor            # (L, D) float16 caption features
    mask: torch.Tensor            # (L,) bool
    caption: str
    meta: dict = field(default_factory=dict)
    more: tuple = ()              # several text encoders: ((text, mask), ...) of encoders 1, 2, ...

    @property
    def features(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One ``(text, mask)`` per text encoder."""
        return [(self.text, self.mask), *self.more]


@torch.no_grad()
def encode_shards(src: str | os.PathLike, out: str | os.PathLike, autoencoder, text_encoder,
                  buckets: list[tuple[int, int]] | None = None, resolution: int | None = None,
                  batch_size: int = 32, progress: bool = True) -> Path:
    """Encode the image shards in ``src`` into latent shards in ``out``.

    ``buckets``: ``(height, width)`` sizes; each image goes to the nearest aspect ratio (multi-aspect
    training). Otherwise ``resolution`` (square) or, with neither, each image's own size. Finished shards
    are kept when the command is run again (an interrupted encode continues where it stopped).
    """
    from tqdm.auto import tqdm

    from ..nn.io import atomic_save_safetensors
    from ..text import encode_features
    from .base import center_crop_resize, image_to_tensor
    from .buckets import assign_bucket
    from .latent_cache import encoder_records

    records = encoder_records(text_encoder)
    suffixes = [""] if len(records) == 1 else [f"_{k}" for k in range(len(records))]

    source = ShardStream(src, shuffle=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(iter(autoencoder.parameters())).device if hasattr(autoencoder, "parameters") else "cpu"
    shards, sizes, channels = [], {}, None
    for s, name in enumerate(tqdm(source.shards, desc="encoding shards", disable=not progress)):
        target = out / f"latent-{s:06d}.safetensors"
        samples, skipped = [], 0
        for key, parts in source._samples(source.dir / name):
            try:
                samples.append(source._decode(key, parts))
            except Exception:  # undecodable image or empty caption: skipped, counted in index.json
                skipped += 1
        if target.is_file():  # finished by an earlier, interrupted run
            try:
                with safe_open(str(target), "pt") as f:
                    done = json.loads(f.metadata()["keys"])
                    meta_sizes = json.loads(f.metadata()["sizes"])
                if len(done) == len(samples):
                    shards.append({"name": target.name, "count": len(done), "skipped": skipped})
                    for k, v in meta_sizes.items():
                        sizes[k] = sizes.get(k, 0) + v
                    continue
            except (SafetensorError, OSError, KeyError, ValueError):
                pass  # broken: encode again
        images = []
        for smp in samples:
            w, h = smp.image.size
            if buckets:
                size = buckets[assign_bucket(h, w, buckets)]
            elif resolution:
                size = (resolution, resolution)
            else:
                size = (h, w)
            images.append(smp.image if (h, w) == tuple(size) else center_crop_resize(smp.image, size))
        tensors, shard_sizes = {}, {}
        # group by size so every encoder batch holds one grid
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault((im.size[1], im.size[0]), []).append(i)
        for (h, w), idx in by_size.items():
            for b in range(0, len(idx), batch_size):
                chunk = idx[b:b + batch_size]
                x = torch.stack([image_to_tensor(images[i]) for i in chunk]).to(device)
                z = autoencoder.encode_latents(x).float().cpu()
                for i, zi in zip(chunk, z):
                    tensors[f"{i:06d}.latent"] = zi.contiguous()
                channels = z.shape[1]
            shard_sizes[f"{h}x{w}"] = len(idx)
        captions = [smp.caption for smp in samples]
        for b in range(0, len(captions), 256):
            for suffix, (tok, m) in zip(suffixes, encode_features(text_encoder, captions[b:b + 256])):
                for j, (t, mm) in enumerate(zip(tok.cpu(), m.cpu())):
                    keep = int(mm.nonzero().max()) + 1 if mm.any() else 1
                    tensors[f"{b + j:06d}.text{suffix}"] = t[:keep].half().contiguous()
                    tensors[f"{b + j:06d}.mask{suffix}"] = mm[:keep].bool().contiguous()
        meta = {"keys": json.dumps([smp.meta.get("key", str(i)) for i, smp in enumerate(samples)]),
                "captions": json.dumps(captions), "sizes": json.dumps(shard_sizes)}
        atomic_save_safetensors(tensors, target, metadata=meta)
        shards.append({"name": target.name, "count": len(samples), "skipped": skipped})
        for k, v in shard_sizes.items():
            sizes[k] = sizes.get(k, 0) + v
    if channels is None and shards:  # every shard was already done: read the channel count back
        with safe_open(str(out / shards[0]["name"]), "pt") as f:
            channels = f.get_slice("000000.latent").get_shape()[0]
    index = {"format": FORMAT, "shards": shards, "total": sum(s["count"] for s in shards),
             "skipped": sum(s["skipped"] for s in shards), "latent_channels": int(channels),
             "text_dim": records[0]["dim"], "sizes": dict(sorted(sizes.items())),
             "buckets": [list(b) for b in buckets] if buckets else None, "source": str(src)}
    if len(records) > 1:
        index.update(text_dims=[r["dim"] for r in records], text_encoders=records)
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


class LatentShardStream(_ShardCursor):
    """Stream :class:`LatentSample` from latent shards (``snapgen data encode``); see ``_ShardCursor``."""

    kind = "latent shard"
    hint = "write one with `snapgen data encode`"

    def __init__(self, directory: str | os.PathLike, rank: int = 0, world: int = 1, worker: int = 0,
                 workers: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(directory, rank, world, worker, workers, seed, shuffle)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.dir} holds {self.index.get('format', 'image')!r} shards, not latent "
                             f"shards; encode them with `snapgen data encode {self.dir} --out DIR ...`")
        self.counts = {s["name"]: int(s["count"]) for s in self.index["shards"]}
        n = len(self.index.get("text_encoders") or [None])
        self.suffixes = [""] if n == 1 else [f"_{k}" for k in range(n)]

    def _samples(self, path: Path):
        try:
            with safe_open(str(path), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                captions = json.loads(f.metadata()["captions"])
                names = set(f.keys())
                for i, key in enumerate(keys):
                    n = f"{i:06d}"
                    text_keys = [(f"{n}.text{s}", f"{n}.mask{s}") for s in self.suffixes]
                    if {f"{n}.latent", *(k for pair in text_keys for k in pair)} <= names:
                        feats = [(f.get_tensor(t), f.get_tensor(m)) for t, m in text_keys]
                        yield key, {"latent": f.get_tensor(f"{n}.latent"), "text": feats[0][0], "mask": feats[0][1],
                                    "more": feats[1:], "caption": captions[i]}
                    else:
                        yield key, None
        except (SafetensorError, OSError, KeyError, ValueError):
            # an unreadable shard: every one of its samples is skipped (and counted), positions stay valid
            for i in range(self.counts.get(path.name, 0)):
                yield f"{path.name}:{i}", None

    def _decode(self, key: str, parts: dict | None) -> LatentSample:
        if parts is None:
            raise ValueError(f"sample {key} is unreadable")
        latent = parts["latent"].float()
        feats = [(parts["text"], parts["mask"].bool())] + [(t, m.bool()) for t, m in parts.get("more", ())]
        if latent.dim() != 3 or not torch.isfinite(latent).all() or \
                any(t.dim() != 2 or m.shape != t.shape[:1] for t, m in feats):
            raise ValueError(f"sample {key} has malformed tensors")
        return LatentSample(latent, *feats[0], parts["caption"], {"key": key}, more=tuple(feats[1:]))


class BucketBatcher:
    """Batches of ``batch_size`` samples sharing one latent grid, dealt from a stream in arrival order.

    A sample waits in its bucket until the bucket is full; ``state()`` holds the stream position and the
    positions of the waiting samples, so after ``load_state`` the batches continue exactly.
    """

    def __init__(self, stream: _ShardCursor, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream, self.batch_size = stream, batch_size
        self.pending: dict[tuple, list] = {}

    def __iter__(self):
        for smp in self.stream:
            grid = tuple(smp.latent.shape)
            bucket = self.pending.setdefault(grid, [])
            bucket.append(smp)
            if len(bucket) == self.batch_size:
                del self.pending[grid]
                yield bucket

    def state(self) -> dict:
        return {"stream": self.stream.state(),
                "pending": [[list(s.meta["position"]) for s in b] for b in self.pending.values()]}

    def load_state(self, state: dict) -> None:
        self.stream.load_state(state["stream"])
        self.pending = {}
        for positions in state.get("pending", []):
            samples = [self.stream.fetch(p) for p in positions]
            if samples:
                self.pending[tuple(samples[0].latent.shape)] = samples


def collate_latents(batch: list[LatentSample]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``x0 (B, C, h, w)`` and the (first) text encoder's features ``(tokens (B, L, D), mask (B, L))`` padded to
    the longest."""
    x0 = torch.stack([s.latent for s in batch])
    return x0, _pad([(s.text, s.mask) for s in batch])


def collate_features(batch: list[LatentSample]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``x0`` and the feature list: one ``(tokens, mask)`` per text encoder, each padded to its longest."""
    x0 = torch.stack([s.latent for s in batch])
    n = len(batch[0].features)
    return x0, [_pad([s.features[k] for s in batch]) for k in range(n)]


def _pad(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(t.shape[0] for t, _ in rows)
    D = rows[0][0].shape[1]
    tokens = torch.zeros(len(rows), L, D, dtype=torch.float32)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (t, m) in enumerate(rows):
        tokens[i, :t.shape[0]] = t.float()
        mask[i, :m.shape[0]] = m
    return tokens, mask
