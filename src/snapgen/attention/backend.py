"""Which BNA backend ``"auto"`` runs, and why: the decision, its log line and :func:`backend_report`.

``"auto"`` (the model default) runs, on CUDA, compiled ``flex_attention`` with a cached block mask
(``flex.py``) for fp16/bf16/fp32 tensors with head size >= 16; on CPU, the fused kernel (``cpu_kernel.py``)
where it applies and is faster -- fp32, row chunks of fewer than 768 tokens, kernel built; and ``gather``
otherwise, and always while tracing/exporting/compiling (the exported or compiled graph holds the portable
backend). Each distinct choice is logged once at DEBUG level on the ``snapgen.attention`` logger with its
reason (``logging.getLogger("snapgen.attention").setLevel("DEBUG")`` to see it), and remembered for
:func:`backend_report`, which :func:`snapgen.env.describe` puts into run folders and eval reports. Nothing is
recorded while tracing or compiling.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .cpu_kernel import kernel_error, kernel_status, load_kernel

if TYPE_CHECKING:
    from .bna import TileGeometry

__all__ = ["FUSED_MAX_TILE_TOKENS", "FLEX_DTYPES", "FLEX_MIN_HEAD_DIM", "auto_backend", "backend_report",
           "check_fused_inputs", "model_backends", "use_fused_kernel"]

_log = logging.getLogger("snapgen.attention")

# From this many tokens per row chunk PyTorch's CPU flash kernel uses 256-row query blocks (q_len >= 768) and
# runs as fast as the fused kernel (measured at 16384 tokens, 1024-token chunks; docs/performance.md).
FUSED_MAX_TILE_TOKENS = 767

# flex_attention's CUDA (Triton) kernels take these dtypes; heads of fewer than 16 channels (below the K of
# a Triton dot) are left to SDPA's kernels through gather, untried with flex here
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLEX_MIN_HEAD_DIM = 16

_FLEX = "CUDA tensors: compiled flex_attention with a cached block mask"
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


def _choose(reason: str, backend: str) -> str:
    if reason not in _choices:
        _note(reason, backend)
    return backend


def _cuda_choice(dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """``(reason, backend)`` for CUDA tensors of ``dtype`` with ``head_dim`` channels per head."""
    if dtype in FLEX_DTYPES and head_dim >= FLEX_MIN_HEAD_DIM:
        return _FLEX, "flex"
    return (f"{dtype} CUDA tensors with head size {head_dim} (flex runs float16/bfloat16/float32 with head size "
            f">= {FLEX_MIN_HEAD_DIM})", "gather")


def auto_backend(q, k, v, geom: TileGeometry) -> str:
    """The backend ``"auto"`` runs for these inputs: ``"flex"``, ``"fused"`` or ``"gather"`` (module docstring)."""
    if _exporting():  # no Python side effects inside traced / compiled code; the graph holds gather
        return "gather"
    if q.device.type == "cuda":
        return _choose(*_cuda_choice(q.dtype, q.shape[-1]))
    if not geom.is_identity_tiling:
        reason = _TILES
    elif geom.tile_tokens > FUSED_MAX_TILE_TOKENS:
        reason = _LONG
    elif not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)):
        reason = f"{q.dtype} tensors on {q.device.type} (the fused kernel runs fp32 CPU tensors)"
    elif not load_kernel():
        reason = f"fused kernel unavailable: {str(kernel_error()).splitlines()[0]}"
    else:
        return _choose(_FUSED, "fused")
    return _choose(reason, "gather")


def use_fused_kernel(q, k, v, geom: TileGeometry) -> bool:
    """Whether backend ``"auto"`` runs the fused CPU kernel for these inputs (see the module docstring)."""
    return auto_backend(q, k, v, geom) == "fused"


def model_backends(module: torch.nn.Module) -> list[str]:
    """The ``bna_backend`` settings of a model's attention layers (sorted, distinct; empty without BNA)."""
    return sorted({m.bna_backend for m in module.modules() if isinstance(getattr(m, "bna_backend", None), str)})


def backend_report(requested: str | list[str] | None = None, build: bool = False) -> dict:
    """What BNA runs here, as a JSON-able dict:

    * ``requested``: the model's ``bna_backend`` (as given; ``None`` when unknown);
    * ``kernel_status``: ``built`` / ``disabled-by-env`` / ``build-failed`` (with ``kernel_error``) /
      ``not-loaded-yet`` (nothing has needed it yet; ``build=True`` builds it now), or ``not-applicable``
      when no requested backend can use it (e.g. ``gather``);
    * ``auto_choices``: every distinct choice ``auto`` made so far in this process, reason -> backend;
    * ``flex_compile``: ``SNAPGEN_FLEX_COMPILE`` as parsed (``auto`` = flex compiled on CUDA only).
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
            "auto_choices": dict(_choices),
            "flex_compile": _flex_compile_setting()}


def _flex_compile_setting() -> str:
    try:
        return _env.flex_compile()
    except ValueError as e:  # reported, not raised: the report must not fail
        return f"error: {e}"


def modules_backend(modules) -> str | list[str] | None:
    """The ``bna_backend`` setting(s) of a module or a dict of modules (``None`` when none has ASSA)."""
    mods = modules.values() if isinstance(modules, dict) else [modules]
    found = sorted({b for m in mods if hasattr(m, "modules") for b in model_backends(m)})
    return found[0] if len(found) == 1 else (found or None)


from .. import env as _env  # noqa: E402

_env.register_report("attention", backend_report)
