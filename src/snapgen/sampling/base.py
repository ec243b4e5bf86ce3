"""One description of how to sample: :class:`SamplerConfig`, the :class:`Sampler` protocol and the registry.

A ``SamplerConfig`` (kind, steps, shift, times, guidance) is everything the eager pipeline, the exported
runtimes (ONNX / ExecuTorch), the distillation export and K-DMD's step grid need to agree on;
:func:`make_sampler` turns it into a sampler. Time convention (docs/conventions.md): from ``t = 1`` (noise)
down to ``t = 0`` (data), ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``.

``pipeline.json`` and ``export.json`` keep the sampler in their original flat fields (``sampler``, ``steps``,
``guidance``, ``shift``, ``few_step_times``); :meth:`SamplerConfig.from_fields` / :meth:`SamplerConfig.to_fields`
are the one mapping between those fields and a ``SamplerConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..registry import Registry
from ..utils.random import Generators

__all__ = ["SAMPLERS", "Sampler", "SamplerConfig", "VelocityFn", "make_sampler"]

# A velocity function takes (x_t, t[B]) and returns v; conditioning and guidance are closed over by the caller
# (snapgen.sampling.guided builds one from a Denoiser).
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS: Registry = Registry("sampler")

DEFAULT_STEPS = 20


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    * ``kind``: a registered sampler, ``"euler"`` (ODE, Sec. 3.1's base model) or ``"few_step"`` (the
      distilled generator's predict-x0-and-re-noise sampler, Sec. 3.2);
    * ``steps``: number of model evaluations (``None``: ``len(times) - 1``, or 20 without times);
    * ``shift``: SD3 time shift of the derived grid ``sampling_times(steps, shift)``;
    * ``times``: an explicit grid from 1 to exactly 0, used when ``steps == len(times) - 1``; at any other step
      count (e.g. a distilled pipeline asked for 2 steps) and when empty, the grid is derived from ``steps``
      and ``shift`` (:func:`snapgen.sampling.time_grid`; the pipeline's rule since few-step sampling exists);
    * ``guidance``: CFG weight ``w`` in ``v_u + w (v_c - v_u)`` (1 = no guidance), applied by the velocity
      function (:func:`snapgen.sampling.guided`), not by the sampler;
    * ``stage_steps`` / ``stage_thresholds``: the ``"dfm"`` stage-scheduled sampler's steps per pyramid stage and
      the times (t = 1 noise) at which each next stage starts (:mod:`snapgen.sampling.dfm`); ``steps`` is their
      sum. Empty for every other kind.
    """

    kind: str = "euler"
    steps: int | None = None
    shift: float = 1.0
    times: tuple[float, ...] = ()
    guidance: float = 1.0
    stage_steps: tuple[int, ...] = ()
    stage_thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        SAMPLERS.get(self.kind)  # unknown kind: an error listing the known ones
        try:
            times = tuple(float(t) for t in self.times)
        except (TypeError, ValueError):
            raise ValueError(f"sampler times must be a list of numbers, got {self.times!r}") from None
        object.__setattr__(self, "times", times)
        if times:
            _check_times(times)
        steps = self.steps
        if self.kind == "dfm" or self.stage_steps or self.stage_thresholds:
            steps = self._check_stages(steps)
        if steps is None:
            steps = len(times) - 1 if times else DEFAULT_STEPS
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampler steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", steps)
        for name in ("shift", "guidance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"sampler {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.shift <= 0:
            raise ValueError(f"sampler shift must be positive, got {self.shift}")
        if self.guidance < 0:
            raise ValueError(f"sampler guidance must be >= 0 (1 = no guidance), got {self.guidance}")

    def _check_stages(self, steps):
        from .dfm import check_stage_settings

        if self.kind != "dfm":
            raise ValueError(f"stage_steps / stage_thresholds are settings of the 'dfm' sampler, not {self.kind!r}")
        stage_steps, thresholds = check_stage_settings(self.stage_steps, self.stage_thresholds)
        object.__setattr__(self, "stage_steps", stage_steps)
        object.__setattr__(self, "stage_thresholds", thresholds)
        if steps is not None and steps != sum(stage_steps):
            raise ValueError(f"a dfm sampler takes sum(stage_steps) = {sum(stage_steps)} steps, got steps={steps}: "
                             f"set stage_steps (e.g. --stage-steps) to change the step count")
        return sum(stage_steps)

    # --- dict / legacy fields ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"kind": self.kind, "steps": self.steps, "shift": self.shift, "times": list(self.times),
             "guidance": self.guidance}
        if self.kind == "dfm":
            d.update(stage_steps=list(self.stage_steps), stage_thresholds=list(self.stage_thresholds))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        if isinstance(d, SamplerConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"a sampler config must be a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown sampler config keys {unknown}; valid keys are {names}")
        if "kind" not in d:
            raise ValueError(f"a sampler config needs 'kind' (one of {', '.join(SAMPLERS.names())})")
        return cls(**d)

    @classmethod
    def from_fields(cls, sampler: str = "euler", steps: int = DEFAULT_STEPS, guidance: float = 1.0,
                    shift: float = 1.0, few_step_times=(), stage_steps=(), stage_thresholds=()) -> "SamplerConfig":
        """The sampler described by ``pipeline.json``'s / ``export.json``'s flat fields.

        ``few_step_times`` are read by the few-step sampler only (an Euler pipeline ignores them), as every
        snapgen release has read them; ``stage_steps`` / ``stage_thresholds`` by the dfm sampler only (its step
        count is their sum: ``steps`` is not read)."""
        times = tuple(few_step_times or ()) if sampler == "few_step" else ()
        if sampler == "dfm":  # its steps are the stages' (a stale ``steps`` field is not an error)
            return cls(kind=sampler, steps=None, shift=shift, guidance=guidance, stage_steps=tuple(stage_steps or ()),
                       stage_thresholds=tuple(stage_thresholds or ()))
        return cls(kind=sampler, steps=steps, shift=shift, times=times, guidance=guidance)

    def to_fields(self) -> dict:
        """The inverse of :meth:`from_fields`: ``{sampler, steps, guidance, shift, few_step_times}`` (and
        ``stage_steps`` / ``stage_thresholds`` for a dfm sampler)."""
        if self.times and self.kind != "few_step":
            raise ValueError(f"a {self.kind!r} sampler with explicit times cannot be written to pipeline.json's "
                             f"fields (few_step_times are read by the few-step sampler only)")
        fields = {"sampler": self.kind, "steps": self.steps, "guidance": self.guidance, "shift": self.shift,
                  "few_step_times": self.times}
        if self.kind == "dfm":
            fields.update(stage_steps=self.stage_steps, stage_thresholds=self.stage_thresholds)
        return fields

    def settings(self) -> dict:
        """``{sampler, steps, guidance, shift}`` (what ``TextToImagePipeline.sampling_settings`` returns)."""
        return {"sampler": self.kind, "steps": self.steps, "guidance": self.guidance, "shift": self.shift}

    # --- call-time overrides ----------------------------------------------------------------------
    def override(self, steps: int | None = None, shift: float | None = None,
                 guidance: float | None = None) -> "SamplerConfig":
        """This config with the given call-time settings (None: unchanged). Explicit ``times`` stay: they are
        the grid at their own step count (where ``shift`` does not apply), any other count is derived."""
        return dataclasses.replace(self, steps=self.steps if steps is None else steps,
                                   shift=self.shift if shift is None else shift,
                                   guidance=self.guidance if guidance is None else guidance)

    def uses_times(self) -> bool:
        """Whether the explicit ``times`` are the grid (``steps == len(times) - 1``)."""
        return bool(self.times) and len(self.times) == self.steps + 1

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)


def _check_times(times: tuple[float, ...]) -> None:
    if len(times) < 2:
        raise ValueError(f"sampler times need at least 2 entries (1 ... 0), got {list(times)}")
    if not all(math.isfinite(t) for t in times):
        raise ValueError(f"sampler times must be finite, got {list(times)}")
    if times[0] != 1.0 or times[-1] != 0.0:
        raise ValueError(f"sampler times must run from 1 (noise) to exactly 0 (data), got {list(times)}")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"sampler times must be strictly decreasing, got {list(times)}")


@runtime_checkable
class Sampler(Protocol):
    """A sampler built from a :class:`SamplerConfig` (``make_sampler``)."""

    config: SamplerConfig

    def times(self) -> torch.Tensor:
        """The time grid, ``steps + 1`` float32 times from 1 to exactly 0."""
        ...

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, generator: Generators = None,
               progress: bool = False) -> torch.Tensor:
        """Latents from ``noise`` (at ``t = 1``); ``generator`` feeds any noise the sampler draws: one generator
        for the batch, or a list of one generator per row of ``noise`` (row ``i``'s noise from ``generator[i]``
        only, drawn with :func:`snapgen.utils.random.randn`), or ``None``."""
        ...


def make_sampler(config: SamplerConfig | dict) -> Sampler:
    """The sampler ``config`` describes (a dict is read with :meth:`SamplerConfig.from_dict`)."""
    config = SamplerConfig.from_dict(config)
    return SAMPLERS.get(config.kind)(config)
