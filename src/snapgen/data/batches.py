"""Which items form a batch: a pure function of ``(seed, step)``, so resuming needs no data-loader state.

Data parallelism and gradient accumulation split one step's *global* batch of ``batch_size x parts`` items
(``parts = ranks x accumulation steps``) into ``parts`` consecutive slices; part ``p`` computes on slice
``p``. Every task draws its items with :func:`part_indices`, so N ranks, or N accumulation steps, see exactly
the items one process sees with the whole batch, and ``parts = 1`` is the plain :func:`batch_indices`.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["batch_indices", "part_indices", "part_slice"]


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Items of step ``step``: consecutive slices of a fresh permutation per epoch (all items once per epoch)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = _permutation(seed, epoch, n)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
    return np.asarray(out)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 7919, epoch]).permutation(n)


def part_slice(part: int, parts: int, batch_size: int) -> slice:
    """Rows of part ``part`` (of ``parts``) in a global batch of ``batch_size * parts`` rows."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} outside 0..{parts - 1}")
    return slice(part * batch_size, (part + 1) * batch_size)


def part_indices(seed: int, step: int, n: int, batch_size: int, part: int = 0, parts: int = 1) -> np.ndarray:
    """Items of part ``part`` of step ``step``: its slice of the global batch ``batch_indices(..., batch_size *
    parts)``. The trainer numbers parts ``micro * world + rank`` (accumulation step ``micro`` on rank ``rank``)."""
    return batch_indices(seed, step, n, batch_size * parts)[part_slice(part, parts, batch_size)]
