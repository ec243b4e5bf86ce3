"""Aspect-ratio buckets for multi-aspect training (the paper pre-trains multi-aspect).

:func:`aspect_buckets` lists image sizes of about the same area as ``base x base`` whose sides are multiples
of ``multiple`` (the model's pixels per Middle-stage token: VAE factor x patch x 2), from ``max_ratio``
portrait to ``max_ratio`` landscape. Every image goes to the bucket with the nearest log aspect ratio; a
batch holds one bucket only, so the DiT sees one token grid per batch (RoPE and BNA tiles follow the grid).

:class:`BucketBatchSampler` deals the batches: per epoch, each bucket's items are shuffled and cut into
batches, then all batches are shuffled together (seeded by ``(seed, epoch)``), and batch ``i`` goes to rank
``i % world``. Incomplete batches are dropped. Its position (epoch, batch) is a plain dict for checkpoints.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["aspect_buckets", "assign_bucket", "BucketBatchSampler"]


def aspect_buckets(base: int = 256, multiple: int = 32, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(height, width)`` sizes with ``h * w ~= base^2``, sides multiples of ``multiple``, ratio <= max_ratio."""
    if base % multiple:
        raise ValueError(f"base {base} must be a multiple of {multiple}")
    area = base * base
    out = set()
    for w in range(multiple, int(base * math.sqrt(max_ratio)) + multiple, multiple):
        h = max(multiple, round(area / w / multiple) * multiple)
        if max(h / w, w / h) <= max_ratio + 1e-9:
            out.add((h, w))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def assign_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket with the nearest log aspect ratio."""
    r = math.log(width / height)
    return int(np.argmin([abs(math.log(w / h) - r) for h, w in buckets]))


class BucketBatchSampler:
    def __init__(self, bucket_of: list[int], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.bucket_of = np.asarray(bucket_of)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """``(bucket, item indices)`` of every full batch of ``epoch``, in the epoch's order (all ranks)."""
        rng = np.random.default_rng([self.seed, 4421, epoch])
        batches = []
        for b in np.unique(self.bucket_of):
            items = rng.permutation(np.flatnonzero(self.bucket_of == b))
            for i in range(0, len(items) - self.batch_size + 1, self.batch_size):
                batches.append((int(b), items[i:i + self.batch_size]))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self):
        while True:
            mine = self.epoch_batches(self.epoch)[self.rank::self.world]
            if not mine:
                raise ValueError("no full batch for this rank: more data or a smaller batch size is needed")
            while self.position < len(mine):
                batch = mine[self.position]
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
