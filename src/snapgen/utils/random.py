"""Random draws that are correct on every device: the one place snapgen calls ``torch.rand*`` with a generator.

PyTorch refuses a CPU ``torch.Generator`` for CUDA tensors. snapgen's generators are CPU generators (seeded
from the config, checkpointed for exact resume, and the same stream on every machine), so every seeded draw is
made on the generator's own device and then moved to where it is used. On CPU this is exactly the plain call
(same values, same generator state afterwards). Seeded draws are made in fp32 and cast, so a seed gives the same
noise (up to rounding) at every precision. ``tests/test_random_calls.py`` scans the source and fails on
any other call that passes both a generator and a device.

Per-image noise: ``generator`` may also be a list of generators, one per row of the draw (``shape[0]`` rows).
Row ``i`` is then drawn from ``generator[i]`` alone (shape ``(1, *shape[1:])``, the numbers a one-row draw
from that generator gives) and the rows are stacked, so a row's noise does not depend on the other rows:
image ``i`` of a batch seeded ``[s_0, s_1, ...]`` gets the noise of a one-image call seeded ``s_i``.
:func:`seed_generators` turns a pipeline's ``seed`` argument (int, list of ints or None) into the generator(s).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["randn", "rand", "seed_generators", "Generators"]

# one generator for the whole draw, one per row (per image), or none (the target device's own RNG)
Generators = torch.Generator | Sequence[torch.Generator] | None


def seed_generators(seed, n: int) -> Generators:
    """The generator(s) of a pipeline call on ``n`` prompts: ``None`` -> ``None`` (unseeded); an int -> one CPU
    generator for the whole batch (the batch's noise is drawn together); a list / tuple of ints, one per
    prompt -> one CPU generator per image, so image ``i`` is the image of a one-prompt call with ``seed[i]``."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"seed is a list of {len(seed)} seed(s) but {n} prompt(s) were given: pass one seed "
                             f"per prompt, or one int for the whole batch")
        for s in seed:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"a seed list holds integers, got {type(s).__name__} ({s!r})")
        return [torch.Generator().manual_seed(int(s)) for s in seed]
    return torch.Generator().manual_seed(int(seed))  # as every release has read an int seed


def _draw(fn, shape, generator, device, dtype) -> torch.Tensor:
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    if not isinstance(generator, torch.Generator):  # one generator per row: drawn row by row, then stacked
        generators = list(generator)
        if not shape or len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generator(s) for a draw of shape {tuple(shape)}: pass one "
                             f"generator per row (shape[0])")
        rows = [fn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
        if len({r.device for r in rows}) > 1:
            rows = [r.to(device=device or rows[0].device) for r in rows]
        return torch.cat(rows).to(device=device, dtype=dtype or torch.get_default_dtype())
    # fp32 on the generator's device, then moved and cast: one seed, the same numbers on every device and dtype
    out = fn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype or torch.get_default_dtype())


def randn(shape, generator: Generators = None, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal samples of ``shape``, drawn from ``generator`` (on its device), placed on ``device``;
    ``generator`` a list: row ``i`` from ``generator[i]``."""
    return _draw(torch.randn, tuple(shape) if not isinstance(shape, int) else (shape,), generator, device, dtype)


def rand(shape, generator: Generators = None, *, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) samples of ``shape``, drawn from ``generator`` (on its device), placed on ``device``;
    ``generator`` a list: row ``i`` from ``generator[i]``."""
    return _draw(torch.rand, tuple(shape) if not isinstance(shape, int) else (shape,), generator, device, dtype)
