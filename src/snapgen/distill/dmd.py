"""Distribution matching distillation (DMD/DMD2), functional core, in the project's flow convention
(``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``, ``x0 = x_t - t v``; ``docs/conventions.md``).

* :func:`dmd_loss` -- DMD2's generator update: re-noised generator samples are scored by the *real*
  (teacher, with CFG) and *fake* (critic) models; the per-sample normalised difference of their x0
  predictions is applied through a stop-gradient MSE, whose gradient w.r.t. the sample is ``grad / numel``:
  a descent step moves the sample toward the teacher's prediction and away from the critic's.
* :func:`backward_simulate` -- training inputs for a multi-step generator: the generator itself is rolled
  out without gradients from pure noise to a sampled step, with the *same* update as the few-step sampler
  (:func:`snapgen.sampling.few_step_sample`), so training sees exactly the inputs inference will produce.
* :func:`critic_loss` -- the critic ("fake score") regresses the flow-matching target on detached
  generator samples, at guidance 1, at times drawn like :func:`sample_tau` (by default DMD2's uniform times).

Every function that draws random numbers takes a ``torch.Generator`` or a :class:`BatchDraws`: the latter
draws for a whole global batch and keeps the caller's rows, so a batch split over ranks or gradient
accumulation steps computes with the numbers of the unsplit batch (data-parallel DMD == one process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..flow.objective import interpolate, shift_time, velocity_target
from ..sampling import SamplerConfig, few_step_sample, make_sampler
from ..utils.random import rand as _rand, randn as _randn

__all__ = ["BatchDraws", "dmd_gradient", "dmd_loss", "sample_tau", "backward_simulate", "critic_loss"]


class BatchDraws:
    """Random numbers of a global batch of ``batch`` rows of which the caller computes ``rows``: each draw is
    made for all rows from ``generator`` (so in the order, and with the values, one process with the whole
    batch draws) and sliced. With ``rows`` = all rows, a draw is exactly ``torch.randn(shape, generator=g)``."""

    def __init__(self, generator: torch.Generator | None, batch: int, rows: slice | None = None):
        self.generator, self.batch = generator, int(batch)
        self.rows = rows if rows is not None else slice(0, self.batch)

    def randn(self, shape, dtype=None, device=None) -> torch.Tensor:
        return _randn((self.batch, *shape[1:]), self.generator, dtype=dtype)[self.rows].to(device)

    def rand(self, n: int, device=None) -> torch.Tensor:
        return _rand(self.batch, self.generator)[self.rows].to(device)


def randn(generator, shape, dtype=None, device=None) -> torch.Tensor:
    if isinstance(generator, BatchDraws):
        return generator.randn(shape, dtype=dtype, device=device)
    return _randn(shape, generator, dtype=dtype, device=device)


def rand(generator, n: int, device=None) -> torch.Tensor:
    if isinstance(generator, BatchDraws):
        return generator.rand(n, device=device)
    return _rand(n, generator, device=device)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``(x0_fake - x0_real) / mean|x - x0_real|`` per sample (DMD2's normaliser from the *real* prediction),
    computed in float64 and with non-finite values zeroed. Moving ``x`` along ``-grad`` approaches the real
    distribution."""
    x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    norm = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * mse(x, sg(x - grad))`` and ``grad``. ``x`` carries the generator's graph; the two x0
    predictions must come from scores computed without gradient."""
    grad = dmd_gradient(x.detach(), x0_real.detach(), x0_fake.detach()).to(x.dtype)
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad


def sample_tau(n: int, low: float = 0.02, high: float = 0.98, shift: float = 1.0,
               generator: torch.Generator | BatchDraws | None = None, device=None) -> torch.Tensor:
    """Re-noising levels for the DMD term: uniform in ``[low, high]`` (DMD2's [0.02, 0.98]), then shifted
    like the sampler's times."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"need 0 <= low < high <= 1, got {low}, {high}")
    u = rand(generator, n, device) * (high - low) + low
    return shift_time(u, shift)


@torch.no_grad()
def backward_simulate(velocity, noise: torch.Tensor, times: torch.Tensor | SamplerConfig, k: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The generator's input at step ``k`` of its schedule ``times`` (``times[0] = 1``; or a ``SamplerConfig``,
    whose grid is used): pure noise for ``k = 0``, else the first ``k`` steps of the few-step sampler (predict
    x0, re-noise with fresh noise)."""
    if isinstance(times, SamplerConfig):
        times = make_sampler(times).times()
    if not 0 <= k < len(times) - 1:
        raise ValueError(f"step k={k} outside the {len(times) - 1}-step schedule")
    if k == 0:
        return noise
    if not isinstance(generator, BatchDraws):
        return few_step_sample(velocity, noise, times[: k + 1], generator=generator)
    x, B = noise, noise.shape[0]  # few_step_sample's update, with the re-noising drawn for the global batch
    for i in range(k):
        t, t_next = float(times[i]), float(times[i + 1])
        x0 = x - t * velocity(x, torch.full((B,), t, dtype=x.dtype, device=x.device))
        x = (1 - t_next) * x0 + t_next * generator.randn(x.shape, dtype=x.dtype, device=x.device) if t_next > 0 else x0
    return x


def critic_loss(critic, x0: torch.Tensor, cond: dict, generator: torch.Generator | BatchDraws | None = None,
                t_low: float = 0.0, t_high: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Flow-matching loss of the critic on (detached) generator samples ``x0``, at times drawn like
    :func:`sample_tau` (uniform in ``[t_low, t_high]``, then shifted by ``shift``). The defaults are DMD2's
    uniform ``U[0, 1]``; K-DMD passes the DMD term's tau range and shift (``KDMDConfig.critic_times``), so the
    critic is trained at the noise levels where the DMD term queries it."""
    x0 = x0.detach()
    t = sample_tau(x0.shape[0], t_low, t_high, shift, generator, x0.device).clamp(1e-5, 1 - 1e-5)
    eps = randn(generator, x0.shape, dtype=x0.dtype, device=x0.device)
    v = critic(interpolate(x0, eps, t), t, cond)
    return F.mse_loss(v.float(), velocity_target(x0, eps).float())
