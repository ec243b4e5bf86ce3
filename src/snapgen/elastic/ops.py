"""Deprecated location: the sliced layers moved to :mod:`snapgen.nn.elastic` (a leaf package, so that
``attention`` and ``models`` no longer import ``elastic``). Kept for one release."""

from ..nn.elastic import *  # noqa: F401,F403
from ..nn.elastic import LoRA, __all__  # noqa: F401

import warnings as _warnings

_warnings.warn("snapgen.elastic.ops is deprecated; import from snapgen.nn.elastic", DeprecationWarning, stacklevel=2)
