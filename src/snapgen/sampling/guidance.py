"""Classifier-free guidance, written once: ``v = v_u + w (v_c - v_u)`` (``w = 1``: no guidance;
docs/conventions.md). The eager pipeline, the exported runtimes and K-DMD's real score all call
:func:`cfg_velocity`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import VelocityFn

__all__ = ["cfg_velocity", "guided"]


def cfg_velocity(model_fn: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None,
                 guidance: float) -> torch.Tensor:
    """One guided velocity. Runs conditional and unconditional branches as one batch of 2B (conditional
    first).

    ``model_fn`` is a Denoiser (or any function called as ``model_fn(x, t, cond)``, e.g. one exported graph
    call); ``cond``/``uncond`` are dicts whose tensors have batch B. ``uncond=None`` or ``guidance == 1`` is
    one conditional call.
    """
    if uncond is None or guidance == 1.0:
        return model_fn(x, t, cond)
    kw = {k: torch.cat([cond[k], uncond[k]]) if torch.is_tensor(cond[k]) else cond[k] for k in cond}
    v_c, v_u = model_fn(torch.cat([x, x]), torch.cat([t, t]), kw).chunk(2)
    return v_u + guidance * (v_c - v_u)


def guided(model: Callable, cond: dict, uncond: dict | None, guidance: float) -> VelocityFn:
    """The velocity function ``(x, t) -> cfg_velocity(model, x, t, cond, uncond, guidance)`` a sampler
    integrates."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_velocity(model, x, t, cond, uncond, guidance)

    return velocity
