"""The fused CPU kernel for blockwise neighbourhood attention on row chunks (``csrc/bna_rows_cpu.cpp``).

Built on first use with ``torch.utils.cpp_extension`` (g++, about 10 s, cached per machine under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) as the CPU implementation of the torch
ops ``torch.ops.snapgen.bna_rows_forward`` / ``bna_rows_backward`` and their ASSA variants with the gate
mix fused in, ``bna_rows_mix_forward`` / ``bna_rows_mix_backward`` (defined below, with fake-tensor and
FLOP-counter formulas).
``-march=native``: the build is tied to this CPU, so the cache name carries a hash of the CPU's flags, and of
the compile flags and the source (a changed kernel or flag is a new build).

Why it exists (``docs/performance.md``): PyTorch's CPU flash attention runs the 256-query row chunks of the
paper's geometry (16 blocks at 64x64 tokens) with 64-row query blocks and returns one gradient per
overlapping key window; this kernel uses the whole chunk as one query block and accumulates dK/dV straight
into the key/value gradient. Measured against the ``gather`` backend on the local branch alone at 4096
tokens: forward -12%, forward+backward -20% (``docs/performance.md``).

``SNAPGEN_BNA_KERNEL=0`` disables it (``backend="auto"`` then uses ``gather``; parsed by :mod:`snapgen.env`).
:func:`kernel_status` says whether it is built, disabled, failed or not loaded yet, without building it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import env
from ..utils.extras import require

__all__ = ["kernel_error", "kernel_status", "load_kernel", "bna_rows", "bna_rows_lerp"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "bna_rows_cpu.cpp"
_lock = threading.Lock()
# -march=native + the parts of -ffast-math that let gcc vectorise the softmax's sum reductions
# (-fassociative-math, which needs -fno-signed-zeros and -fno-trapping-math) without libm calls
# (-fno-math-errno). Not -ffinite-math-only: with it gcc may assume no NaN/Inf, and a NaN in q came out as a
# finite row (the kernel must propagate NaN/Inf where the definition does; tested). Not -ffast-math itself,
# whose startup code would flush denormals process-wide. None of these flags turns a NaN into a number.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++20", "-fno-math-errno", "-fno-trapping-math",
           "-fassociative-math", "-fno-signed-zeros"]
_state: dict[str, object] = {"loaded": False, "error": None}


def _build_tag() -> str:
    """A short hash of what the build depends on: the machine and its CPU feature flags (``-march=native``),
    the compile flags, the source text and its path. It names the build folder, so a changed source or flag
    builds anew instead of reusing (or racing with) another checkout's build under the same name."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    try:
        source = _SOURCE.read_bytes()
    except OSError:  # the build itself will report the missing file
        source = b""
    key = "|".join([platform.machine(), flags, " ".join(_CFLAGS), str(_SOURCE.resolve())]).encode() + source
    return hashlib.sha1(key).hexdigest()[:12]


# The ops are defined here, not in C++, so that their schemas, fake-tensor rules (torch.compile, meta-device
# tracing) and FLOP formulas exist whether or not the kernel has been built; the C++ library only registers
# CPU implementations (TORCH_LIBRARY_IMPL).
_lib = torch.library.Library("snapgen", "DEF")
_lib.define("bna_rows_forward(Tensor q, Tensor k, Tensor v, int tile_tokens, int window, int radius) "
            "-> (Tensor, Tensor)")
_lib.define("bna_rows_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
            "int tile_tokens, int window, int radius) -> (Tensor, Tensor, Tensor)")
# ASSA's gate mix fused in: out = lerp(BNA(q, k, v), end, weight), end = the global branch, weight = the gate
_lib.define("bna_rows_mix_forward(Tensor q, Tensor k, Tensor v, Tensor end, Tensor weight, int tile_tokens, "
            "int window, int radius, bool save_local) -> (Tensor, Tensor, Tensor)")
_lib.define("bna_rows_mix_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor local, Tensor lse, "
            "Tensor end, Tensor weight, int tile_tokens, int window, int radius) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("snapgen::bna_rows_forward")
def _(q, k, v, tile_tokens, window, radius):
    B, N, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, Hq, N)


@torch.library.register_fake("snapgen::bna_rows_backward")
def _(grad_out, q, k, v, out, lse, tile_tokens, window, radius):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


@torch.library.register_fake("snapgen::bna_rows_mix_forward")
def _(q, k, v, end, weight, tile_tokens, window, radius, save_local):
    B, N, Hq, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    local = torch.empty_like(out) if save_local else q.new_empty(0)
    return out, local, q.new_empty(B, Hq, N)


@torch.library.register_fake("snapgen::bna_rows_mix_backward")
def _(grad_out, q, k, v, local, lse, end, weight, tile_tokens, window, radius):
    return (*(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, q)),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _one_matmul(q_shape, tile_tokens: int, window: int) -> int:
    """FLOPs of one (rows x window keys x d) matmul over every query row: the FLOPs are those of the
    equivalent dense attention on each (chunk, window) pair, counted like torch counts SDPA."""
    B, N, Hq, d = q_shape
    return 2 * B * Hq * N * window * tile_tokens * d


@register_flop_formula(torch.ops.snapgen.bna_rows_forward)
def _(q_shape, k_shape, v_shape, tile_tokens, window, radius, *args, **kwargs) -> int:
    return 2 * _one_matmul(q_shape, tile_tokens, window)  # Q K^T and P V


@register_flop_formula(torch.ops.snapgen.bna_rows_backward)
def _(grad_out_shape, q_shape, k_shape, v_shape, saved_out_shape, lse_shape, tile_tokens, window, radius,
      *args, **kwargs) -> int:
    return 5 * _one_matmul(q_shape, tile_tokens, window)  # recomputed Q K^T, dV, dP, dQ, dK


@register_flop_formula(torch.ops.snapgen.bna_rows_mix_forward)
def _(q_shape, k_shape, v_shape, end_shape, weight_shape, tile_tokens, window, radius, *args, **kwargs) -> int:
    return 2 * _one_matmul(q_shape, tile_tokens, window)  # the mix is elementwise (uncounted, like lerp)


@register_flop_formula(torch.ops.snapgen.bna_rows_mix_backward)
def _(grad_out_shape, q_shape, k_shape, v_shape, local_shape, lse_shape, end_shape, weight_shape, tile_tokens,
      window, radius, *args, **kwargs) -> int:
    return 5 * _one_matmul(q_shape, tile_tokens, window)


@contextlib.contextmanager
def _ninja_on_path():
    """cpp_extension runs ``ninja`` from PATH; the ``ninja`` wheel (the ``snapgen[kernel]`` extra) puts it next
    to the venv's python, which is not on PATH when ``.venv/bin/python`` runs without an activated venv. The
    one place snapgen writes to ``os.environ`` (documented in :mod:`snapgen.env`): PATH is restored exactly
    after. Neither on PATH nor installed: :class:`~snapgen.utils.extras.MissingExtra` naming the extra (the
    caller then falls back to ``gather`` with one logged line)."""
    old = os.environ.get("PATH")
    bin_dir = None
    if shutil.which("ninja") is None:
        bin_dir = require("ninja", "building the fused CPU attention kernel").BIN_DIR
    if bin_dir is None:  # ninja already on PATH: PATH is left alone
        yield
        return
    os.environ["PATH"] = bin_dir + os.pathsep + (old or "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def load_kernel(raise_on_error: bool = False) -> bool:
    """Build (once per machine) and load the kernel; ``True`` when ``torch.ops.snapgen.bna_rows_*`` exist.
    On failure returns ``False`` (the reason in :func:`kernel_error`), or raises with ``raise_on_error``."""
    if _state["loaded"]:  # the hot path (every ASSA call with backend "auto"): no lock once loaded
        return True
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            if not env.bna_kernel_enabled():
                _state["error"] = "disabled by SNAPGEN_BNA_KERNEL=0"
            else:
                try:
                    from torch.utils.cpp_extension import load

                    _log.info("building/loading the fused CPU BNA kernel (first build takes ~10 s)")
                    with _ninja_on_path():
                        load(name=f"snapgen_bna_rows_{_build_tag()}", sources=[str(_SOURCE)],
                             extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                             is_python_module=False, verbose=False)
                    _state["loaded"] = True
                except Exception as exc:  # no compiler, no ninja, unsupported platform...
                    _state["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
                    _log.warning("fused CPU BNA kernel unavailable (%s); using the 'gather' backend",
                                 str(_state["error"]).splitlines()[0])
        if not _state["loaded"] and raise_on_error:
            raise RuntimeError(
                f"the fused CPU BNA kernel could not be loaded: {_state['error']}\n"
                "It is compiled on first use with g++ and ninja (pip install 'snapgen[kernel]'); set "
                "SNAPGEN_BNA_KERNEL=0 or use backend='gather' to run without it.")
        return bool(_state["loaded"])


def kernel_error() -> str | None:
    """Why the kernel is unavailable (after a failed :func:`load_kernel`), else ``None``."""
    return _state["error"]  # type: ignore[return-value]


def kernel_status() -> str:
    """``"built"``, ``"disabled-by-env"`` (``SNAPGEN_BNA_KERNEL=0``, whether or not a load was tried),
    ``"build-failed"`` (the reason in :func:`kernel_error`) or ``"not-loaded-yet"``; never builds it."""
    if _state["loaded"]:
        return "built"
    error = _state["error"]
    if error is not None:
        return "disabled-by-env" if str(error).startswith("disabled by") else "build-failed"
    try:
        return "not-loaded-yet" if env.bna_kernel_enabled() else "disabled-by-env"
    except ValueError:  # a bad SNAPGEN_BNA_KERNEL: load_kernel will raise with the message
        return "not-loaded-yet"


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _BNARows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tile_tokens: int, window: int, radius: int):
        out, lse = torch.ops.snapgen.bna_rows_forward(q, k, v, tile_tokens, window, radius)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry = (tile_tokens, window, radius)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.snapgen.bna_rows_backward(_unit_stride(grad_out), q, k, v, out, lse, *ctx.geometry)
        return dq, dk, dv, None, None, None


class _BNARowsMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, end, weight, tile_tokens: int, window: int, radius: int):
        save_local = any(ctx.needs_input_grad[:5])
        out, local, lse = torch.ops.snapgen.bna_rows_mix_forward(q, k, v, end, weight, tile_tokens, window, radius,
                                                                save_local)
        if save_local:
            ctx.save_for_backward(q, k, v, local, lse, end, weight)
        ctx.geometry = (tile_tokens, window, radius)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, local, lse, end, weight = ctx.saved_tensors
        grads = torch.ops.snapgen.bna_rows_mix_backward(_unit_stride(grad_out), q, k, v, local, lse, end, weight,
                                                        *ctx.geometry)
        return (*grads, None, None, None)


def bna_rows_lerp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor, weight: torch.Tensor,
                  tile_tokens: int, window: int, radius: int) -> torch.Tensor:
    """``torch.lerp(bna_rows(q, k, v, ...), end, weight)`` in one kernel call -- ASSA's gate mix with ``end`` the
    global branch ``(B, N, Hq, d)`` and ``weight`` the gate ``(B, N, Hq)`` -- so neither the mix nor its
    backward makes extra passes over memory. Differentiable in all five tensors."""
    load_kernel(raise_on_error=True)
    if weight.dim() == 4 and weight.shape[-1] == 1:
        weight = weight.squeeze(-1)
    return _BNARowsMix.apply(*map(_unit_stride, (q, k, v, end)), weight.contiguous(), tile_tokens, window, radius)


def bna_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_tokens: int, window: int,
             radius: int) -> torch.Tensor:
    """BNA on row chunks of ``tile_tokens`` tokens with the fused kernel (loads it, raising if it cannot).
    Heads-last fp32 CPU tensors ``q (B, N, Hq, d)``, ``k, v (B, N, Hkv, d)``, unit stride over ``d``."""
    load_kernel(raise_on_error=True)
    return _BNARows.apply(*map(_unit_stride, (q, k, v)), tile_tokens, window, radius)
