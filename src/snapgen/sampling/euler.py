"""The Euler ODE sampler of the flow-matching base model (SnapGen++ Sec. 3.1; SD3's shifted schedule)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..utils.random import Generators
from .base import SAMPLERS, SamplerConfig, VelocityFn

__all__ = ["EulerSampler", "euler_sample", "sampling_times", "shift_time", "time_grid"]


def shift_time(t: torch.Tensor | float, shift: float):
    """``a t / (1 + (a - 1) t)``: maps 0 -> 0 and 1 -> 1, pushes mass toward 1 (noise) for ``a > 1``."""
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sampling_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` times from 1 to 0: ``linspace(1, 0)`` then shifted (``shift > 1`` spends more
    steps at high noise). The last time is exactly 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def time_grid(config: SamplerConfig) -> torch.Tensor:
    """The grid of ``config``: its ``times`` (float32) at their own step count, else
    ``sampling_times(config.steps, config.shift)``."""
    if config.uses_times():
        return torch.tensor(config.times, dtype=torch.float32)
    return sampling_times(config.steps, config.shift)


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor,
                 progress: bool = False) -> torch.Tensor:
    """Integrate ``dx/dt = v`` from ``times[0]`` (noise) to ``times[-1]`` with Euler steps:
    ``x <- x + (t_next - t) v``."""
    x = noise
    B = x.shape[0]
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="sampling", leave=False):
        t, t_next = float(times[i]), float(times[i + 1])
        v = velocity(x, torch.full((B,), t, dtype=x.dtype, device=x.device))
        x = x + (t_next - t) * v
    return x


class GridSampler:
    """A sampler over the config's time grid (:func:`time_grid`); subclasses define ``sample``."""

    def __init__(self, config: SamplerConfig):
        self.config = config

    def times(self) -> torch.Tensor:
        return time_grid(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


@SAMPLERS.register("euler")
class EulerSampler(GridSampler):
    """:func:`euler_sample` on the config's grid; deterministic (``generator``, one or a list, is unused)."""

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, generator: Generators = None,
               progress: bool = False) -> torch.Tensor:
        return euler_sample(velocity_fn, noise, self.times(), progress=progress)
