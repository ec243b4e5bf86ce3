"""The few-step sampler of distilled generators (DMD / K-DMD, SnapGen++ Sec. 3.2): predict x0, re-noise."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import SAMPLERS, VelocityFn
from .euler import GridSampler
from ..utils.random import Generators, randn

__all__ = ["FewStepSampler", "few_step_sample"]


@torch.no_grad()
def few_step_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor,
                    generator: Generators = None, progress: bool = False) -> torch.Tensor:
    """At each time predict ``x0 = x - t v`` and re-noise to the next time with *fresh* noise,
    ``x = (1 - t_next) x0 + t_next eps``. The last time must be 0, where the prediction is returned as is.
    K-DMD's backward simulation runs the first ``k`` steps of this loop (``distill.dmd.backward_simulate``).
    ``generator``: one for the batch, or a list of one per row of ``noise`` (row ``i``'s re-noising noise is drawn
    from ``generator[i]`` alone, :func:`snapgen.utils.random.randn`), so a row does not depend on the others."""
    x = noise
    B = x.shape[0]
    for i in tqdm(range(len(times) - 1), disable=not progress, desc="sampling", leave=False):
        t, t_next = float(times[i]), float(times[i + 1])
        v = velocity(x, torch.full((B,), t, dtype=x.dtype, device=x.device))
        x0 = x - t * v
        if t_next > 0:
            eps = randn(x.shape, generator, dtype=x.dtype, device=x.device)
            x = (1 - t_next) * x0 + t_next * eps
        else:
            x = x0
    return x


@SAMPLERS.register("few_step")
class FewStepSampler(GridSampler):
    """:func:`few_step_sample` on the config's ``times``, or on ``sampling_times(steps, shift)`` when none are
    given or the step count differs from theirs (a distilled pipeline asked for another step count).
    Draws its re-noising noise from ``generator`` (one, or a list of one per image), after the caller's initial
    noise."""

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, generator: Generators = None,
               progress: bool = False) -> torch.Tensor:
        return few_step_sample(velocity_fn, noise, self.times(), generator=generator, progress=progress)
