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

from ..sampling import cfg_velocity, euler_sample, few_step_sample, sampling_times  # noqa: E402  (moved there)

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
