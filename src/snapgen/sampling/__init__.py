"""Sampling: one :class:`SamplerConfig` -> one sampler (``make_sampler``), and CFG written once (``guided``).

Used by the eager pipeline, the exported runtimes (ONNX / ExecuTorch), the distillation export and K-DMD's
step grid. New samplers (e.g. DFM's stage-scheduled sampler, streaming video sampling) are new files here that
register with ``@SAMPLERS.register("name")`` and are imported below.
"""

from .base import SAMPLERS, Sampler, SamplerConfig, VelocityFn, make_sampler
from .euler import EulerSampler, euler_sample, sampling_times, time_grid
from .few_step import FewStepSampler, few_step_sample
from .dfm import DFMSampler, dfm_sample, stage_schedule
from .guidance import cfg_velocity, guided

__all__ = [
    "SAMPLERS",
    "DFMSampler",
    "EulerSampler",
    "FewStepSampler",
    "Sampler",
    "SamplerConfig",
    "VelocityFn",
    "cfg_velocity",
    "dfm_sample",
    "euler_sample",
    "few_step_sample",
    "guided",
    "make_sampler",
    "sampling_times",
    "stage_schedule",
    "time_grid",
]
