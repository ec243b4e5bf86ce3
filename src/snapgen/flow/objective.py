"""The flow-matching objective in one page.

Convention (fixed project-wide): t in [0, 1], t = 1 is noise,
``x_t = (1 - t) * x0 + t * eps``, the model predicts ``v = eps - x0``, and ``x0 = x_t - t * v``.

Training times are drawn logit-normal (SD3, minRF): ``t = sigmoid(N(m, s))``, then *shifted* toward noise
for larger images with ``t' = a t / (1 + (a - 1) t)``, where ``a = sqrt(tokens / base_tokens)`` (SD3's
resolution-dependent shift: at more tokens the same noise level destroys less signal per token, so more
time must be spent at high noise). The same shift is used by the sampler. ``t`` is sampled directly,
never by indexing a descending, already-shifted table (the diffusers SD3-script pitfall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..sampling.euler import shift_time  # one time shift for training times and sampling grids
from ..utils.random import randn

__all__ = [
    "FlowMatchingLoss",
    "Noised",
    "interpolate",
    "logit_normal_times",
    "loss_per_time_bin",
    "resolution_shift",
    "shift_time",
    "time_bins",
    "velocity_target",
    "x0_from_velocity",
]


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` (t per sample or scalar)."""
    t = _bcast(t, x0)
    return torch.lerp(x0, eps, t)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t - _bcast(t, x_t) * v


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """SD3's resolution-dependent shift ``sqrt(num_tokens / base_tokens)`` (1 at the base resolution)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError("token counts must be positive")
    return math.sqrt(num_tokens / base_tokens)


def logit_normal_times(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                       generator: torch.Generator | None = None, device=None,
                       eps: float = 1e-5) -> torch.Tensor:
    """``n`` training times ``shift(sigmoid(N(mean, std)))``, clamped to ``[eps, 1 - eps]``."""
    u = randn(n, generator, device=device) * std + mean
    return shift_time(torch.sigmoid(u), shift).clamp(eps, 1 - eps)


def time_bins(t: torch.Tensor, n_bins: int = 5) -> torch.Tensor:
    """Index of the equal-width bin of [0, 1] each time falls in."""
    return (t * n_bins).long().clamp(0, n_bins - 1)


def loss_per_time_bin(loss: torch.Tensor, t: torch.Tensor, n_bins: int = 5) -> list[tuple[float, int]]:
    """(sum of per-sample losses, count) per time bin, to be averaged over a logging window (minRF)."""
    idx = time_bins(t.detach(), n_bins)
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, loss.detach().double())
    counts = torch.bincount(idx, minlength=n_bins)
    return [(float(s), int(c)) for s, c in zip(sums, counts)]


@dataclass
class Noised:
    """One batch of a flow objective, ready for the model: its input ``x`` at times ``t``, the velocity
    ``target`` it must predict, and what the objective needs to score a prediction (``extra``)."""

    x: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    extra: dict = field(default_factory=dict)


class FlowMatchingLoss:
    """Rectified-flow loss ``|| model(x_t, t, ...) - (eps - x0) ||^2`` with logit-normal times.

    ``__call__(model, x0, cond=...)`` returns ``(loss, per_sample_loss, t)``; the model is called as a
    Denoiser, ``model(x_t, t, cond)`` (extra keyword arguments, e.g. ``text=``, are merged into ``cond``).
    ``shift=None`` uses :func:`resolution_shift` of the latent's token count. The steps are also offered one by
    one, for wrappers that call the model themselves (elastic widths): :meth:`draw` (times, noise),
    :meth:`noised` (the model's input and target), :meth:`error` (per-sample loss of a prediction).
    """

    name = "fm"

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float | None = 1.0,
                 base_tokens: int = 256, patch_size: int = 2):
        self.mean, self.std, self.shift = mean, std, shift
        self.base_tokens, self.patch_size = base_tokens, patch_size

    def shift_for(self, x0: torch.Tensor) -> float:
        if self.shift is not None:
            return self.shift
        h, w = x0.shape[-2:]
        return resolution_shift((h // self.patch_size) * (w // self.patch_size), self.base_tokens)

    def draw(self, x0_shape: tuple, generator: torch.Generator | None = None, device=None, stage=None):
        """``(t, eps)`` for a batch of latents of ``x0_shape``: the times first, then the noise (``stage``: DFM's,
        unused here)."""
        probe = torch.empty(x0_shape, device="meta")  # shift_for reads the shape only
        t = logit_normal_times(x0_shape[0], self.mean, self.std, self.shift_for(probe), generator, device)
        return t, randn(self.noise_shape(x0_shape), generator, device=device)

    def noise_shape(self, x0_shape: tuple) -> tuple:
        return tuple(x0_shape)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Noised:
        return Noised(interpolate(x0, eps, t), t, velocity_target(x0, eps))

    def error(self, v: torch.Tensor, noised: Noised, target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample mean squared error of ``v`` against ``target`` (default: the velocity target)."""
        target = noised.target if target is None else target
        return F.mse_loss(v.float(), target.float(), reduction="none").flatten(1).mean(1)

    def mean_error(self, v: torch.Tensor, noised: Noised, target: torch.Tensor | None = None) -> torch.Tensor:
        """The batch mean of :meth:`error` (computed as one mean over every element: the same number)."""
        target = noised.target if target is None else target
        return F.mse_loss(v.float(), target.float())

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, cond: dict | None = None, **cond_kw):
        if t is None:
            t = logit_normal_times(x0.shape[0], self.mean, self.std, self.shift_for(x0), generator, x0.device)
        if eps is None:
            eps = randn(self.noise_shape(x0.shape), generator, device=x0.device, dtype=x0.dtype)
        n = self.noised(x0, t, eps)
        per_sample = self.error(model(n.x, n.t, {**(cond or {}), **cond_kw}), n)
        return per_sample.mean(), per_sample, self.logged_time(n)

    def logged_time(self, noised: Noised) -> torch.Tensor:
        """The ``(B,)`` time a per-time-bin log bins each sample by."""
        return noised.t
