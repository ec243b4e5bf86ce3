"""Samplers: Euler ODE with time shift and classifier-free guidance, and the stochastic few-step sampler.

The CFG formula is the one used everywhere in snapgen: ``v = v_u + w (v_c - v_u)`` (``w = 1``: no
guidance). Times run from 1 (noise) to 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .objective import shift_time

__all__ = ["cfg_velocity", "euler_sample", "few_step_sample", "sampling_times"]

# A velocity function takes (x_t, t[B]) and returns v; conditioning is closed over by the caller.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` times from 1 to 0: ``linspace(1, 0)`` then shifted (``shift > 1`` spends more
    steps at high noise). The last time is exactly 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def cfg_velocity(model_fn: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None,
                 guidance: float) -> torch.Tensor:
    """One guided velocity. Runs conditional and unconditional branches as one batch of 2B.

    ``model_fn`` is a Denoiser, called as ``model_fn(x, t, cond)``; ``cond``/``uncond`` are dicts whose
    tensors have batch B.
    """
    if uncond is None or guidance == 1.0:
        return model_fn(x, t, cond)
    kw = {k: torch.cat([cond[k], uncond[k]]) if torch.is_tensor(cond[k]) else cond[k] for k in cond}
    v_c, v_u = model_fn(torch.cat([x, x]), torch.cat([t, t]), kw).chunk(2)
    return v_u + guidance * (v_c - v_u)


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


@torch.no_grad()
def few_step_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The few-step sampler of distilled generators (DMD): at each time predict ``x0 = x - t v`` and
    re-noise to the next time with *fresh* noise, ``x = (1 - t_next) x0 + t_next eps``. The last time
    must be 0, where the prediction is returned as is."""
    x = noise
    B = x.shape[0]
    for i in range(len(times) - 1):
        t, t_next = float(times[i]), float(times[i + 1])
        v = velocity(x, torch.full((B,), t, dtype=x.dtype, device=x.device))
        x0 = x - t * v
        if t_next > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = (1 - t_next) * x0 + t_next * eps
        else:
            x = x0
    return x
