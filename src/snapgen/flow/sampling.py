"""Moved to :mod:`snapgen.sampling` (one sampler path for pipeline, exports and distillation); this module
re-exports the functions for one release."""

from ..sampling.euler import euler_sample, sampling_times
from ..sampling.few_step import few_step_sample
from ..sampling.guidance import cfg_velocity

__all__ = ["cfg_velocity", "euler_sample", "few_step_sample", "sampling_times"]

import warnings as _warnings

_warnings.warn("snapgen.flow.sampling is deprecated; import from snapgen.sampling", DeprecationWarning, stacklevel=2)
