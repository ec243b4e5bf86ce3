"""Deprecated location: model folder I/O moved to :mod:`snapgen.nn.io`. Kept for one release."""

from ..nn.io import *  # noqa: F401,F403
from ..nn.io import __all__, read_safetensors  # noqa: F401

import warnings as _warnings

_warnings.warn("snapgen.models.io is deprecated; import from snapgen.nn.io", DeprecationWarning, stacklevel=2)
