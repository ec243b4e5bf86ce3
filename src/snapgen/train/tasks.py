"""Moved to :mod:`snapgen.tasks` (one module per task) and :mod:`snapgen.data.batches`; this module
re-exports the old names for one release."""

from ..data.batches import batch_indices
from ..tasks import AutoencoderTask, DistillTask, FlowTask, build_task, psnr, validation_loss
from ..tasks.base import check_keys as _check_keys  # noqa: F401

__all__ = ["build_task", "AutoencoderTask", "FlowTask", "DistillTask", "batch_indices", "psnr", "validation_loss"]

import warnings as _warnings

_warnings.warn("snapgen.train.tasks is deprecated; import from snapgen.tasks (and snapgen.data.batches)", DeprecationWarning, stacklevel=2)
