"""DFM's progressive generation in a pipeline [DFM Sec. 3.3] (arXiv 2506.19839): the packed pyramid noise, the
stage-scheduled sampler, the recomposed latent and the preview of the coarse levels as each stage ends."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..flow.pyramid import Pyramid
from ..utils.random import randn

__all__ = ["dfm_latents", "default_dfm_sampling"]


def default_dfm_sampling(levels: int, steps: int, sampling: dict) -> dict:
    """``{stage_steps, stage_thresholds}`` of a DFM pipeline from a config's ``sampling:`` section: given, or for
    two levels the paper's 3:1 split of ``steps`` (30 + 10 of 40) and tau = 0.3 (the paper's 0.7 at 512 px, t = 1
    data; snapgen's t = 1 is noise)."""
    stage_steps, taus = sampling.get("stage_steps"), sampling.get("stage_thresholds")
    if stage_steps is None and taus is None and levels == 2:
        first = max(1, round(0.75 * steps))
        return {"stage_steps": (first, max(1, steps - first)), "stage_thresholds": (0.3,)}
    if stage_steps is None or taus is None:
        raise ValueError(f"a {levels}-level DFM model needs sampling.stage_steps ({levels} step counts) and "
                         f"sampling.stage_thresholds ({levels - 1} decreasing times in (0, 1), t = 1 noise)")
    return {"stage_steps": tuple(int(n) for n in stage_steps), "stage_thresholds": tuple(float(x) for x in taus)}


def dfm_latents(levels: int, sampler, velocity, latent_shape: tuple, generator, device, dtype,
                progress: bool = False, on_preview: Callable | None = None) -> torch.Tensor:
    """The latents ``(B, C, h, w)`` of a DFM model: the packed pyramid noise (the first draw from ``generator``),
    the ``dfm`` sampler, the levels recomposed. ``on_preview(k, latents, seconds)`` gets, when stage ``k`` ends
    (every stage but the last), the prediction of the levels started so far brought up to full resolution."""
    if sampler.config.kind != "dfm":
        raise ValueError(f"a DFM model ({levels} pyramid levels) samples with the dfm sampler, not "
                         f"{sampler.config.kind!r}: set sampler: dfm with stage_steps / stage_thresholds")
    if sampler.stages != levels:
        raise ValueError(f"the dfm sampler has {sampler.stages} stage(s) (stage_steps) but the model has "
                         f"{levels} pyramid levels: give one step count per level")
    B, C, h, w = latent_shape
    pyr = Pyramid(levels)
    noise = randn((B, *pyr.packed_shape(C, (h, w))), generator, device=device, dtype=dtype)
    t0 = time.perf_counter()

    def on_stage(k: int, x0: torch.Tensor) -> None:
        if on_preview is not None:
            on_preview(k, pyr.preview(pyr.unpack(x0)[:k + 1]), time.perf_counter() - t0)

    out = sampler.sample(velocity, noise, generator=generator, progress=progress, split=pyr.channel_split(C),
                         on_stage=on_stage)
    return pyr.recompose(pyr.unpack(out))
