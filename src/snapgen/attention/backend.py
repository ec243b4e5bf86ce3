"""Which BNA backend ``"auto"`` runs, and why: the decision, its log line and :func:`backend_report`.

``"auto"`` (the model default) runs the fused CPU kernel (``cpu_kernel.py``) where it applies and is faster
-- CPU, fp32, row chunks of fewer than 768 tokens, not while tracing/exporting/compiling, kernel built --
and ``gather`` otherwise. Each distinct choice is logged once at DEBUG level on the ``snapgen.attention``
logger with its reason (``logging.getLogger("snapgen.attention").setLevel("DEBUG")`` to see it), and
remembered for :func:`backend_report`, which :func:`snapgen.env.describe` puts into run folders and eval
reports. Nothing is recorded while tracing or compiling (the exported graph runs ``gather``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .cpu_kernel import kernel_error, kernel_status, load_kernel

if TYPE_CHECKING:
    from .bna import TileGeometry

__all__ = ["FUSED_MAX_TILE_TOKENS", "backend_report", "check_fused_inputs", "model_backends", "use_fused_kernel"]

_log = logging.getLogger("snapgen.attention")

# From this many tokens per row chunk PyTorch's CPU flash kernel uses 256-row query blocks (q_len >= 768) and
# runs as fast as the fused kernel (measured at 16384 tokens, 1024-token chunks; docs/performance.md).
FUSED_MAX_TILE_TOKENS = 767

_FUSED = "fp32 CPU row chunks of <= 767 tokens and the kernel is built"
_TILES = "2-D tiles or a padded grid (the fused kernel runs row chunks only)"
_LONG = "row chunks of >= 768 tokens (PyTorch's flash kernel is as fast there)"
# reason -> backend, for every distinct choice "auto" made in this process (a handful of strings at most)
_choices: dict[str, str] = {}


# torch.compiler.is_exporting is torch >= 2.7; on 2.6, is_compiling() covers torch.compile and strict torch.export
# (2.6's default mode). Only 2.13 is tested here.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _exporting() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or _is_exporting() or torch.onnx.is_in_onnx_export())


def check_fused_inputs(q, k, v, geom: TileGeometry) -> None:
    if not geom.is_identity_tiling:
        raise ValueError(f"BNA backend 'fused' needs row chunks (tiles spanning the grid width, no padding); got "
                         f"tile {geom.tile} on grid {geom.grid}. Use backend='gather' or 'auto' for 2-D tiles.")
    bad = [f"{name} {t.dtype} on {t.device}" for name, t in (("q", q), ("k", k), ("v", v))
           if t.device.type != "cpu" or t.dtype != torch.float32]
    if bad:
        raise ValueError(f"BNA backend 'fused' runs float32 CPU tensors only; got {', '.join(bad)}. "
                         f"Use backend='gather' or 'auto'.")


def _note(reason: str, backend: str) -> None:
    _choices[reason] = backend
    _log.debug("BNA backend 'auto' runs %r: %s", backend, reason)


def use_fused_kernel(q, k, v, geom: TileGeometry) -> bool:
    """Whether backend ``"auto"`` runs the fused CPU kernel for these inputs (see the module docstring)."""
    if not geom.is_identity_tiling:
        reason = _TILES
    elif geom.tile_tokens > FUSED_MAX_TILE_TOKENS:
        reason = _LONG
    elif not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)):
        reason = f"{q.dtype} tensors on {q.device.type} (the fused kernel runs fp32 CPU tensors)"
    elif _exporting():
        return False
    elif not load_kernel():
        reason = f"fused kernel unavailable: {str(kernel_error()).splitlines()[0]}"
    else:
        if _FUSED not in _choices:
            _note(_FUSED, "fused")
        return True
    if not _exporting() and reason not in _choices:  # no Python side effects inside traced / compiled code
        _note(reason, "gather")
    return False


def model_backends(module: torch.nn.Module) -> list[str]:
    """The ``bna_backend`` settings of a model's attention layers (sorted, distinct; empty without BNA)."""
    return sorted({m.bna_backend for m in module.modules() if isinstance(getattr(m, "bna_backend", None), str)})


def backend_report(requested: str | list[str] | None = None, build: bool = False) -> dict:
    """What BNA runs here, as a JSON-able dict:

    * ``requested``: the model's ``bna_backend`` (as given; ``None`` when unknown);
    * ``kernel_status``: ``built`` / ``disabled-by-env`` / ``build-failed`` (with ``kernel_error``) /
      ``not-loaded-yet`` (nothing has needed it yet; ``build=True`` builds it now), or ``not-applicable``
      when no requested backend can use it (e.g. ``gather``);
    * ``auto_choices``: every distinct choice ``auto`` made so far in this process, reason -> backend.
    """
    if build:
        load_kernel()
    wanted = [requested] if isinstance(requested, str) else list(requested or [])
    status = kernel_status()
    if wanted and not {"auto", "fused"} & set(wanted):
        status = "not-applicable"
    return {"requested": requested if isinstance(requested, str) or requested is None else wanted,
            "kernel_status": status,
            "kernel_error": kernel_error() if status == "build-failed" else None,
            "auto_choices": dict(_choices)}


def modules_backend(modules) -> str | list[str] | None:
    """The ``bna_backend`` setting(s) of a module or a dict of modules (``None`` when none has ASSA)."""
    mods = modules.values() if isinstance(modules, dict) else [modules]
    found = sorted({b for m in mods if hasattr(m, "modules") for b in model_backends(m)})
    return found[0] if len(found) == 1 else (found or None)


from .. import env as _env  # noqa: E402

_env.register_report("attention", backend_report)
