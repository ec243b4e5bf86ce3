"""Random draws that are correct on every device: the one place snapgen calls ``torch.rand*`` with a generator.

PyTorch refuses a CPU ``torch.Generator`` for CUDA tensors. snapgen's generators are CPU generators (seeded
from the config, checkpointed for exact resume, and the same stream on every machine), so every seeded draw is
made on the generator's own device and then moved to where it is used. On CPU this is exactly the plain call
(same values, same generator state afterwards). Seeded draws are made in fp32 and cast, so a seed gives the same
noise (up to rounding) at every precision. ``tests/test_random_calls.py`` scans the source and fails on
any other call that passes both a generator and a device.
"""

from __future__ import annotations

import torch

__all__ = ["randn", "rand"]


def _draw(fn, shape, generator, device, dtype) -> torch.Tensor:
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    # fp32 on the generator's device, then moved and cast: one seed, the same numbers on every device and dtype
    out = fn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype or torch.get_default_dtype())


def randn(shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal samples of ``shape``, drawn from ``generator`` (on its device), placed on ``device``."""
    return _draw(torch.randn, tuple(shape) if not isinstance(shape, int) else (shape,), generator, device, dtype)


def rand(shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) samples of ``shape``, drawn from ``generator`` (on its device), placed on ``device``."""
    return _draw(torch.rand, tuple(shape) if not isinstance(shape, int) else (shape,), generator, device, dtype)
