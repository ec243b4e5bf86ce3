"""Device and dtype names as users type them (``--device``, ``--dtype``, ``device:`` in configs), resolved
once, with errors that name the problem and the fix instead of a CUDA traceback at the first tensor."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]

# the names --dtype accepts -> torch dtypes (fp32 is the default everywhere)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) -> ``cuda`` when a GPU is visible, else ``cpu``; otherwise the named device,
    checked to exist (``cuda:3`` on a 2-GPU machine is refused here, not at the first kernel launch)."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             f"use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` (or the long names, or a torch dtype) -> the torch dtype; ``None`` is
    fp32. Half precision on a CPU is allowed (it runs) but warned about by the callers that know it is slow."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not one snapgen runs models in: use fp32, bf16 or fp16")
        return name
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use fp32, bf16 or fp16")
    dtype = DTYPES[key]
    if dtype is torch.bfloat16 and device is not None and device.type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                             f"use --dtype fp16 or fp32")
    return dtype
