"""DFM's stage-scheduled sampler [DFM Sec. 3.3] (arXiv 2506.19839): the pyramid levels of the latent start one
after another and then advance together, each on its own times.

Convention (snapgen's, docs/conventions.md): t = 1 is noise. The paper writes t = 1 for data, so its threshold
"tau = 0.7 at 512 px" is 0.3 here; the official code (snap-research/elit ``dfm_utils/samplers_dfm.py``) already
uses t = 1 noise and ships ``stage_sampling_thresholds: [0.1]`` (0.9 in the paper's terms).

The schedule (:func:`stage_schedule`), for S stages, per-stage step counts ``n_1 .. n_S`` and thresholds
``tau_1 > ... > tau_{S-1}`` (``b_k = tau_k``, ``b_S = 0``):

* chunk k (``n_k`` Euler steps) starts stage k: it goes linearly from 1 to ``b_k``;
* every earlier stage moves, in the same proportion, from ``b_{k-1}`` to ``b_k`` (so at the end of chunk k all
  started stages stand at ``b_k``, and all reach 0 together at the end);
* later stages have not started: they are marked :data:`NOT_STARTED` (the model zeroes their input and embeds
  them at t = 1) and are not integrated.

For two stages this is the official schedule exactly (stage 1 continues from tau to 0 as ``t_1 = tau * t_2``).
For three or more the official one maps earlier stages back up in time (and raises); composing per-stage ranges
as above is monotone for any S (tests/test_dfm.py). The state is the pyramid's packed latent (levels stacked
along channels, :meth:`snapgen.flow.pyramid.Pyramid.pack`); ``split`` gives each level's channel count. The
velocity function is called with ``t`` of shape ``(B, S)``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..utils.random import Generators
from .base import SAMPLERS, SamplerConfig, VelocityFn

__all__ = ["NOT_STARTED", "DFMSampler", "check_stage_settings", "dfm_sample", "stage_schedule"]

# The stage time that marks a pyramid level not yet started (> 1: outside the flow's [0, 1]); the model zeroes
# that level's input, embeds it at t = 1 and its output is not used (Alg. 1's mask, the sampler's drop mask).
NOT_STARTED = 2.0


def check_stage_settings(stage_steps, thresholds) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(stage_steps, thresholds)`` validated: one step count >= 1 per stage, S - 1 thresholds strictly
    decreasing inside (0, 1)."""
    try:
        steps = tuple(stage_steps)
        taus = tuple(float(x) for x in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"DFM stage_steps and stage_thresholds must be lists, got {stage_steps!r} and "
                         f"{thresholds!r}") from None
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
        raise ValueError(f"DFM stage_steps must list one integer >= 1 per pyramid stage, got {list(steps)}")
    if len(taus) != len(steps) - 1:
        raise ValueError(f"DFM sampling takes one threshold per stage after the first: {len(steps)} stages need "
                         f"{len(steps) - 1} stage_thresholds, got {len(taus)} ({list(taus)})")
    if any(not 0.0 < x < 1.0 for x in taus) or any(b >= a for a, b in zip(taus, taus[1:])):
        raise ValueError(f"DFM stage_thresholds must be strictly decreasing inside (0, 1) (t = 1 is noise; the "
                         f"paper's tau = 0.7 is 0.3 here), got {list(taus)}")
    return steps, taus


def stage_schedule(stage_steps, thresholds, shift: float = 1.0) -> torch.Tensor:
    """The ``(steps + 1, S)`` float64 grid of stage times. Row ``r -> r + 1`` is one Euler step. Stage k (0-based)
    is :data:`NOT_STARTED` before row ``R_k = n_1 + ... + n_k``, stands at 1 (its noise) at row ``R_k`` and is
    integrated from then on; the last row is all 0. ``shift`` (SD3's, as the Euler sampler's) spaces each chunk's
    steps: the chunk's progress is ``1 - shift_time(1 - i / n)``, so one stage is exactly the shifted Euler grid
    and the thresholds keep their meaning (a stage starts when the newest stands at tau, whatever the shift)."""
    from .euler import shift_time

    steps, taus = check_stage_settings(stage_steps, thresholds)
    S = len(steps)
    ends = list(taus) + [0.0]
    rows = [[1.0] + [NOT_STARTED] * (S - 1)]
    for k, n in enumerate(steps):
        before = 1.0 if k == 0 else ends[k - 1]  # where the earlier stages stand when chunk k starts
        for i in range(1, n + 1):
            w = 1.0 - shift_time(1.0 - i / n, shift)  # the chunk's progress, 0 -> 1
            rows.append([before + (ends[k] - before) * w if s < k else
                         1.0 + (ends[k] - 1.0) * w if s == k else NOT_STARTED for s in range(S)])
        rows[-1][:k + 1] = [ends[k]] * (k + 1)  # the chunk's end, exactly
        if k + 1 < S:
            rows[-1][k + 1] = 1.0  # the next stage starts here, from its noise
    return torch.tensor(rows, dtype=torch.float64)


def default_split(channels: int, stages: int) -> list[int]:
    """The level channel counts of a packed 2-D pyramid state (``C * 4 ** s`` for level s)."""
    unit = sum(4 ** s for s in range(stages))
    if channels % unit:
        raise ValueError(f"a packed state of {channels} channels is not a {stages}-level 2-D pyramid; pass split=")
    return [channels // unit * 4 ** s for s in range(stages)]


@torch.no_grad()
def dfm_sample(velocity: VelocityFn, noise: torch.Tensor, schedule: torch.Tensor, split: list[int] | None = None,
               progress: bool = False, on_stage=None) -> torch.Tensor:
    """Euler steps over the stage ``schedule`` (:func:`stage_schedule`) on the packed ``noise``:
    ``x_s <- x_s + (t_s' - t_s) v_s`` for every started stage. A level not yet started is held at 0 (the model
    ignores it) and takes its noise from ``noise`` when it starts. ``on_stage(k, x0_hat)`` is called when stage
    ``k``'s chunk ends (every chunk but the last), with the packed prediction ``x - t v`` of the started levels
    (later levels 0): the progressive preview, at no extra model call."""
    S = schedule.shape[1]
    split = list(split) if split is not None else default_split(noise.shape[1], S)
    if len(split) != S or sum(split) != noise.shape[1]:
        raise ValueError(f"split {split} does not match a packed state of {noise.shape[1]} channels in {S} stages")
    B = noise.shape[0]
    sched = schedule.to(device=noise.device, dtype=noise.dtype)
    started = schedule <= 1.0  # (rows, S), on the CPU: control flow only
    # the step after which stage k's chunk is over (stage k + 1 starts at the row it leads to)
    chunk_end = {int(r): int(c) for r, c in torch.nonzero(started[1:, 1:] & ~started[:-1, 1:]).tolist()}

    # each packed channel's level, built once: per_level maps (S,) values onto (1, channels, 1, ...)
    level_of = torch.repeat_interleave(torch.arange(S), torch.tensor(split)).to(noise.device)
    shape = (1, -1, *([1] * (noise.dim() - 2)))

    def per_level(values: torch.Tensor) -> torch.Tensor:
        return values.to(noise.device)[level_of].reshape(shape)

    x = torch.where(per_level(started[0]), noise, torch.zeros_like(noise))
    for i in tqdm(range(schedule.shape[0] - 1), disable=not progress, desc="sampling", leave=False):
        if i > 0 and bool((started[i] & ~started[i - 1]).any()):  # a stage starts: its level takes its noise
            x = torch.where(per_level(started[i] & ~started[i - 1]), noise, x)
        now, nxt = sched[i], sched[i + 1]
        v = velocity(x, now.expand(B, S))
        on = per_level(started[i])  # the levels integrated in this step; the others' v is never used
        x = torch.where(on, x + per_level(nxt - now) * v, x)
        if on_stage is not None and i in chunk_end:
            x0 = x - per_level(nxt.clamp(max=1.0)) * v
            on_stage(chunk_end[i], torch.where(on, x0, torch.zeros_like(x0)))
    return x


@SAMPLERS.register("dfm")
class DFMSampler:
    """:func:`dfm_sample` over :func:`stage_schedule` of the config's ``stage_steps`` / ``stage_thresholds`` /
    ``shift`` (``steps`` = their sum); deterministic (``generator`` is unused). ``sample(..., split=, on_stage=)``: the
    packed state's channels per level (:meth:`Pyramid.channel_split`; default a 2-D pyramid) and the preview
    callback."""

    def __init__(self, config: SamplerConfig):
        self.config = config
        self.stage_steps, self.thresholds = check_stage_settings(config.stage_steps, config.stage_thresholds)

    @property
    def stages(self) -> int:
        return len(self.stage_steps)

    def schedule(self) -> torch.Tensor:
        return stage_schedule(self.stage_steps, self.thresholds, self.config.shift)

    def times(self) -> torch.Tensor:
        """The first (coarsest) stage's time at each row (float32, strictly decreasing from 1 to 0: it is started
        throughout); every stage's times: :meth:`schedule`."""
        return self.schedule()[:, 0].float()

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, generator: Generators = None,
               progress: bool = False, split: list[int] | None = None, on_stage=None) -> torch.Tensor:
        return dfm_sample(velocity_fn, noise, self.schedule(), split=split, progress=progress, on_stage=on_stage)

    def __repr__(self) -> str:
        return f"DFMSampler({self.config})"
