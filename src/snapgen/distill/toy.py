"""A 2-D toy for distillation: a Gaussian mixture, a small MLP velocity model with the snapgen call
signature, and the measurements that tell whether a few-step generator covers every mode.

Used by the tests (DMD/K-DMD must turn a many-step flow model into a 4-step generator that covers all modes)
and handy for trying distillation settings in seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..flow.objective import interpolate, velocity_target
from ..models.layers import timestep_embedding

__all__ = ["GaussianMixture2D", "ToyVelocity", "train_toy_flow", "mode_report"]


class GaussianMixture2D:
    """``n_modes`` equal-weight isotropic Gaussians (std ``std``) on a circle of radius ``radius``."""

    def __init__(self, n_modes: int = 8, radius: float = 2.0, std: float = 0.1):
        a = torch.arange(n_modes, dtype=torch.float32) * (2 * math.pi / n_modes)
        self.centers = torch.stack([radius * torch.cos(a), radius * torch.sin(a)], dim=1)
        self.std = std

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, len(self.centers), (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=generator)


class ToyVelocity(nn.Module):
    """MLP velocity ``v(x, t)``, an unconditional Denoiser: ``cond`` is ignored; ``features=("last",)`` also
    returns the last hidden layer as ``{"last": h}``."""

    def __init__(self, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(2 + time_dim, hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, 2)

    feature_taps = ("last",)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None, *, features=(), return_features: bool = False):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        h = F.silu(self.inp(torch.cat([x, timestep_embedding(t, self.time_dim)], dim=1)))
        for layer in self.hidden:
            h = F.silu(layer(h))
        v = self.out(h)
        if return_features:  # deprecated form
            return v, h
        return (v, {"last": h}) if features else v


def train_toy_flow(model: nn.Module, data: GaussianMixture2D, steps: int = 2000, batch: int = 256,
                   lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """Plain flow matching (uniform times) of ``model`` on ``data``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = data.sample(batch, g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(batch, generator=g)
        loss = F.mse_loss(model(interpolate(x0, eps, t), t), velocity_target(x0, eps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def mode_report(samples: torch.Tensor, data: GaussianMixture2D, within_std: float = 4.0) -> dict:
    """``precision``: fraction of samples within ``within_std`` stds of some mode; ``share``: fraction of the
    precise samples at each mode (uniform = 1 / n_modes); ``min_share_ratio``: the least-covered mode's share
    over the uniform share (1 = perfectly even, 0 = a mode is missing)."""
    d = torch.cdist(samples, data.centers)
    dist, nearest = d.min(dim=1)
    ok = dist < within_std * data.std
    n = len(data.centers)
    counts = torch.bincount(nearest[ok], minlength=n).float()
    share = counts / counts.sum().clamp_min(1)
    return {"precision": float(ok.float().mean()), "share": share.tolist(),
            "min_share_ratio": float(share.min() * n)}
