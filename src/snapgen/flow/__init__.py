"""Flow matching: the training objective and time sampling (conventions in docs/conventions.md). The samplers
live in :mod:`snapgen.sampling` and are re-exported here."""

from .objective import (
                        FlowMatchingLoss,
                        interpolate,
                        logit_normal_times,
                        loss_per_time_bin,
                        resolution_shift,
                        shift_time,
                        time_bins,
                        velocity_target,
                        x0_from_velocity,
)

_SAMPLING = ("cfg_velocity", "euler_sample", "few_step_sample", "sampling_times")


def __getattr__(name: str):
    """The samplers moved to :mod:`snapgen.sampling`; ``snapgen.flow.<sampler>`` still works (imported on
    first use, so that ``snapgen.sampling``, which builds on :mod:`.objective`, can import this package)."""
    if name in _SAMPLING:
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
                        "FlowMatchingLoss",
                        "cfg_velocity",
                        "euler_sample",
                        "few_step_sample",
                        "interpolate",
                        "logit_normal_times",
                        "loss_per_time_bin",
                        "resolution_shift",
                        "sampling_times",
                        "shift_time",
                        "time_bins",
                        "velocity_target",
                        "x0_from_velocity",
]
