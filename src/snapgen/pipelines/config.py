"""``pipeline.json``: what a pipeline folder needs besides its weights (text encoder(s), sampler defaults, adapters)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..sampling import SamplerConfig
from ..utils.config import JSONConfigMixin

__all__ = ["PipelineConfig"]


@dataclass(frozen=True)
class PipelineConfig(JSONConfigMixin):
    _config_kind = "TextToImagePipeline"
    _optional_keys = ("sampler", "few_step_times", "adapters", "base_sampling", "stage_steps", "stage_thresholds")

    # "minilm", a transformers folder or Hub id, "onnx:PATH", "paraphrase-minilm-l3" (load_text_encoder); or a list
    # of them (several encoders, their token sequences concatenated in this order; text_max_length: int or list)
    text_encoder: str | list = "minilm"
    text_max_length: int | list = 32
    conditioning: dict = dataclasses.field(default_factory=dict)  # TextConditioning kwargs
    resolution: tuple[int, int] = (64, 64)   # default image size (H, W) in pixels
    # the default sampler, as one snapgen.sampling.SamplerConfig spread over flat fields (sampler_config())
    steps: int = 20
    guidance: float = 4.0
    shift: float = 1.0
    sampler: str = "euler"                   # "euler" or "few_step" (distilled generators)
    few_step_times: tuple[float, ...] = ()   # times for the few-step sampler (ends with 0)
    stage_steps: tuple[int, ...] = ()        # the dfm sampler (DFM models): steps per pyramid stage, and the times
    stage_thresholds: tuple[float, ...] = () # (t = 1 noise) at which each next stage starts
    # distilled pipelines: variant -> LoRA adapter (adapters/<name>.safetensors) switched on with that variant,
    # and the sampling settings of the base (teacher) model, used when the adapters are off (use_base):
    # {sampler, steps, guidance, shift} (base_sampler_config())
    adapters: dict = dataclasses.field(default_factory=dict)
    base_sampling: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.text_encoder, str):  # several encoders: lists in pipeline.json
            from ..text import text_specs

            specs, lengths = text_specs(self.text_encoder, self.text_max_length, "text_encoder")
            object.__setattr__(self, "text_encoder", specs)
            if isinstance(self.text_max_length, (list, tuple)):
                object.__setattr__(self, "text_max_length", lengths)
        object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))
        object.__setattr__(self, "few_step_times", tuple(float(v) for v in self.few_step_times))
        object.__setattr__(self, "stage_steps", tuple(int(v) for v in self.stage_steps))
        object.__setattr__(self, "stage_thresholds", tuple(float(v) for v in self.stage_thresholds))

    def to_dict(self) -> dict:
        """The fields; the dfm sampler's ``stage_steps`` / ``stage_thresholds`` only when set (pipeline.json of
        every other sampler stays as it was)."""
        d = super().to_dict()
        if not self.stage_steps and not self.stage_thresholds:
            del d["stage_steps"], d["stage_thresholds"]
        return d

    # --- the sampler fields as SamplerConfigs (the one place that reads them) ---------------------------
    def sampler_config(self) -> SamplerConfig:
        """The default sampler (``sampler``, ``steps``, ``guidance``, ``shift``, ``few_step_times``; the dfm
        sampler's ``stage_steps`` / ``stage_thresholds``)."""
        return SamplerConfig.from_fields(self.sampler, self.steps, self.guidance, self.shift, self.few_step_times,
                                         self.stage_steps, self.stage_thresholds)

    def base_sampler_config(self) -> SamplerConfig:
        """The base (teacher) model's sampler of a distilled pipeline (``base_sampling``; missing keys: a
        28-step Euler sampler with CFG 4). A few-step base sampler reads ``few_step_times`` at their own step
        count, as the pipeline always has."""
        b = {**_BASE_SAMPLING_DEFAULTS, **self.base_sampling}
        return SamplerConfig.from_fields(b["sampler"], int(b["steps"]), float(b["guidance"]), float(b["shift"]),
                                         self.few_step_times)

    def with_sampler(self, sampler: SamplerConfig) -> "PipelineConfig":
        """This config with ``sampler`` as its default sampler."""
        return self.replace(**sampler.to_fields())

    def with_base_sampler(self, base: SamplerConfig | None) -> "PipelineConfig":
        """This config with ``base`` as the base model's sampler (``None``: no base sampler)."""
        if base is None:
            return self.replace(base_sampling={})
        if base.times and base.times != self.few_step_times:  # a few-step base sampler reads few_step_times
            raise ValueError("the base sampler is stored as {sampler, steps, guidance, shift}: explicit times "
                             "cannot be stored; leave its times empty (derived from steps and shift)")
        fields = base.to_fields()
        del fields["few_step_times"]
        return self.replace(base_sampling=fields)


_BASE_SAMPLING_DEFAULTS = {"sampler": "euler", "steps": 28, "guidance": 4.0, "shift": 1.0}
