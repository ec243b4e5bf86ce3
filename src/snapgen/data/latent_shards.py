"""Latent shards: image shards encoded once (VAE latents + text-encoder features), streamed at scale.

A large run should not re-encode every image and caption each epoch. ``snapgen data encode`` turns the tar
shards of ``snapgen data pack`` into ``latent-NNNNNN.safetensors`` shards (one per image shard, same sample
order), each holding per sample ``{i}.latent`` (C, h, w) float32, ``{i}.text`` (L_i, D) float16 and
``{i}.mask`` (L_i,) bool -- the caption's features trimmed to its own length -- plus the keys and captions
in the file's metadata. With aspect buckets every image is centre-cropped and resized to the bucket of
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

__all__ = ["encode_shards", "LatentSample", "LatentShardStream", "BucketBatcher", "collate_latents"]

FORMAT = "snapgen-latent-shards"


@dataclass
class LatentSample:
    latent: torch.Tensor          # (C, h, w) float32, normalised as the autoencoder's encode_latents gives
    text: torch.Tensor            # (L, D) float16 caption features
    mask: torch.Tensor            # (L,) bool
    caption: str
    meta: dict = field(default_factory=dict)


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
    from .base import center_crop_resize, image_to_tensor
    from .buckets import assign_bucket

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
            tok, m = text_encoder.encode(captions[b:b + 256])
            for j, (t, mm) in enumerate(zip(tok.cpu(), m.cpu())):
                keep = int(mm.nonzero().max()) + 1 if mm.any() else 1
                tensors[f"{b + j:06d}.text"] = t[:keep].half().contiguous()
                tensors[f"{b + j:06d}.mask"] = mm[:keep].bool().contiguous()
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
             "text_dim": int(text_encoder.dim), "sizes": dict(sorted(sizes.items())),
             "buckets": [list(b) for b in buckets] if buckets else None, "source": str(src)}
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

    def _samples(self, path: Path):
        try:
            with safe_open(str(path), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                captions = json.loads(f.metadata()["captions"])
                names = set(f.keys())
                for i, key in enumerate(keys):
                    n = f"{i:06d}"
                    if {f"{n}.latent", f"{n}.text", f"{n}.mask"} <= names:
                        yield key, {"latent": f.get_tensor(f"{n}.latent"), "text": f.get_tensor(f"{n}.text"),
                                    "mask": f.get_tensor(f"{n}.mask"), "caption": captions[i]}
                    else:
                        yield key, None
        except (SafetensorError, OSError, KeyError, ValueError):
            # an unreadable shard: every one of its samples is skipped (and counted), positions stay valid
            for i in range(self.counts.get(path.name, 0)):
                yield f"{path.name}:{i}", None

    def _decode(self, key: str, parts: dict | None) -> LatentSample:
        if parts is None:
            raise ValueError(f"sample {key} is unreadable")
        latent, text, mask = parts["latent"].float(), parts["text"], parts["mask"].bool()
        if latent.dim() != 3 or text.dim() != 2 or mask.shape != text.shape[:1] or not torch.isfinite(latent).all():
            raise ValueError(f"sample {key} has malformed tensors")
        return LatentSample(latent, text, mask, parts["caption"], {"key": key})


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
    """``x0 (B, C, h, w)`` and text features ``(tokens (B, L, D), mask (B, L))`` padded to the longest."""
    x0 = torch.stack([s.latent for s in batch])
    L = max(s.text.shape[0] for s in batch)
    D = batch[0].text.shape[1]
    tokens = torch.zeros(len(batch), L, D, dtype=torch.float32)
    mask = torch.zeros(len(batch), L, dtype=torch.bool)
    for i, s in enumerate(batch):
        tokens[i, :s.text.shape[0]] = s.text.float()
        mask[i, :s.mask.shape[0]] = s.mask
    return x0, (tokens, mask)
