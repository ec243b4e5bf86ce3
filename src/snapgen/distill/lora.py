"""Deprecated location: LoRA adapters moved to :mod:`snapgen.nn.lora` (models, pipelines and tasks use them,
so they live in the leaf layer). Kept for one release."""

from ..nn.lora import *  # noqa: F401,F403
from ..nn.lora import __all__  # noqa: F401

import warnings as _warnings

_warnings.warn("snapgen.distill.lora is deprecated; import from snapgen.nn.lora", DeprecationWarning, stacklevel=2)
