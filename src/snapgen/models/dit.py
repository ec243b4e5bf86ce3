"""Deprecated location: the SnapGen++ DiT lives in :mod:`snapgen.models.three_stage_dit`. Kept for one release."""

from .three_stage_dit import *  # noqa: F401,F403
from .three_stage_dit import __all__, read_text_cond  # noqa: F401

import warnings as _warnings

_warnings.warn("snapgen.models.dit is deprecated; import from snapgen.models.three_stage_dit (or snapgen.models)", DeprecationWarning, stacklevel=2)
