"""Every environment variable snapgen reads, parsed here and nowhere else.

=========================  ===========================================  ===========================================
Variable                   Default                                      Values, and what they change
=========================  ===========================================  ===========================================
``SNAPGEN_MODEL``          ``<repo>/models/snapgen-micro``              a pipeline folder: the model that
                                                                        ``generate`` / ``eval`` / ... load without
                                                                        ``--model`` (:func:`model_dir`)
``SNAPGEN_SCENE_DETECTOR`` ``<repo>/models/evaluators/scene-detector``  a detector folder: SceneEval's detector
                                                                        (:func:`scene_detector_dir`)
``SNAPGEN_IMAGE_ENCODER``  ``<repo>/models/evaluators/image-encoder``   an encoder folder: alignment score and FD
                                                                        (:func:`image_encoder_dir`)
``SNAPGEN_CACHE``          ``~/.cache/snapgen``                         a folder: the rasterised emoji cache lives
                                                                        in ``<it>/emoji`` (:func:`cache_dir`)
``SNAPGEN_BNA_KERNEL``     ``1``                                        ``0`` / ``false`` / ``off`` / ``no``: never
                                                                        build the fused CPU BNA kernel (backend
                                                                        ``auto`` then runs ``gather``); ``1`` /
                                                                        ``true`` / ``on`` / ``yes`` / empty: use it
                                                                        (:func:`bna_kernel_enabled`)
``SNAPGEN_FLEX_COMPILE``   ``auto``                                     ``auto`` / empty: the BNA ``flex`` backend
                                                                        runs ``torch.compile(flex_attention)`` on
                                                                        CUDA, eager flex elsewhere; ``1`` /
                                                                        ``true`` / ``on`` / ``yes``: compiled on
                                                                        every device (CPU too, forward only);
                                                                        ``0`` / ``false`` / ``off`` / ``no``: never
                                                                        (eager flex holds all N x N scores:
                                                                        debugging only) (:func:`flex_compile`)
``SNAPGEN_CPU_ALLOCATOR``  unset                                        ``default``: leave glibc's malloc settings
                                                                        alone (no ``retain_freed_memory``); empty /
                                                                        unset: the trainer keeps freed memory
                                                                        (:func:`cpu_allocator`)
``WORLD_SIZE``             ``1``                                        an int >= 1, set by ``torchrun``: more than
                                                                        one rank turns data parallelism on
                                                                        (:func:`world_size`)
``LOCAL_RANK``             ``0``                                        an int >= 0, set by ``torchrun``: this
                                                                        rank's CUDA device (:func:`local_rank`)
=========================  ===========================================  ===========================================

Path variables: an empty value means the default. Words are case-insensitive and stripped; any other value
raises ``ValueError`` naming the variable. ``torch.distributed`` itself reads ``RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (torchrun's protocol), and ``huggingface_hub`` reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``
(where :func:`snapgen.nn.hub.resolve_pretrained` finds a Hub id, and whether it may download one); snapgen
does not. Each function reads ``os.environ`` when called, so
a value set at run time (``monkeypatch.setenv``) takes effect; what is read once is the parsing, in this
module.

snapgen never writes to ``os.environ``. The one exception: building the fused kernel
(``attention/cpu_kernel.py``, ``_ninja_on_path``) puts the ``ninja`` wheel's folder first on ``PATH`` for
the duration of the build, because ``torch.utils.cpp_extension`` finds ``ninja`` through ``PATH`` only,
and restores the previous value (exactly) right after. ``transformers`` loads pass ``local_files_only=True``
instead of setting ``HF_HUB_OFFLINE``. (Third-party code may still write: torch's first import of
``torch._dynamo``, which ``transformers`` triggers, sets its own default ``TORCHINDUCTOR_CACHE_DIR``.)

:func:`describe` returns the settings in force: these variables, and what changes numerics (torch version,
threads, CPU, the attention backend and why); the trainer writes it to ``env.json`` in the run folder and
``snapgen eval`` into its report.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (shipped weights live under models/)

__all__ = ["VARIABLES", "model_dir", "scene_detector_dir", "image_encoder_dir", "cache_dir", "bna_kernel_enabled",
           "flex_compile", "cpu_allocator", "world_size", "local_rank", "settings", "describe", "cpu_model", "shipped_path",
           "write_json", "record"]

# name -> what it sets (the table above, for `describe` and error messages)
VARIABLES = {
    "SNAPGEN_MODEL": "default pipeline folder",
    "SNAPGEN_SCENE_DETECTOR": "SceneEval detector folder",
    "SNAPGEN_IMAGE_ENCODER": "alignment/FD image encoder folder",
    "SNAPGEN_CACHE": "cache root (emoji rasters in <it>/emoji)",
    "SNAPGEN_BNA_KERNEL": "fused CPU BNA kernel on (1) or off (0)",
    "SNAPGEN_FLEX_COMPILE": "BNA flex_attention compiled: auto (CUDA only), 1 (always) or 0 (never)",
    "SNAPGEN_CPU_ALLOCATOR": "'default' keeps glibc's malloc settings",
    "WORLD_SIZE": "torchrun: number of ranks",
    "LOCAL_RANK": "torchrun: this rank's local index",
}
_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


def _raw(name: str) -> str | None:
    if name not in VARIABLES:  # a typo here would silently read nothing
        raise KeyError(f"{name} is not one of snapgen's environment variables ({', '.join(VARIABLES)})")
    return os.environ.get(name)


def _path(name: str, default: Path) -> Path:
    value = _raw(name)
    return Path(value) if value else default


def _int(name: str, default: int, minimum: int) -> int:
    value = _raw(name)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer "
                         f"({VARIABLES[name]}; default {default})") from None
    if n < minimum:
        raise ValueError(f"environment variable {name}={value!r} must be >= {minimum} ({VARIABLES[name]})")
    return n


def _word(name: str, choices: dict[str, tuple[str, ...]], default: str) -> str:
    value = _raw(name)
    if value is None:
        return default
    word = value.strip().lower()
    for result, words in choices.items():
        if word in words:
            return result
    accepted = ", ".join(repr(w) for words in choices.values() for w in words if w)
    raise ValueError(f"environment variable {name}={value!r} is not understood ({VARIABLES[name]}); "
                     f"use one of {accepted} or leave it unset")


# --------------------------------------------------------------------------------------------------- variables
def shipped_path(name: str, *parts: str) -> Path:
    """``$name`` when set and non-empty, else ``REPO_ROOT / parts``."""
    return _path(name, REPO_ROOT.joinpath(*parts))


def model_dir() -> Path:
    """``$SNAPGEN_MODEL`` or ``models/snapgen-micro`` in the repository."""
    return shipped_path("SNAPGEN_MODEL", "models", "snapgen-micro")


def scene_detector_dir() -> Path:
    """``$SNAPGEN_SCENE_DETECTOR`` or ``models/evaluators/scene-detector``."""
    return shipped_path("SNAPGEN_SCENE_DETECTOR", "models", "evaluators", "scene-detector")


def image_encoder_dir() -> Path:
    """``$SNAPGEN_IMAGE_ENCODER`` or ``models/evaluators/image-encoder``."""
    return shipped_path("SNAPGEN_IMAGE_ENCODER", "models", "evaluators", "image-encoder")


def cache_dir() -> Path:
    """``$SNAPGEN_CACHE`` or ``~/.cache/snapgen`` (the emoji cache is its ``emoji`` subfolder)."""
    return _path("SNAPGEN_CACHE", Path.home() / ".cache" / "snapgen")


def bna_kernel_enabled() -> bool:
    """``False`` when ``SNAPGEN_BNA_KERNEL`` is ``0`` / ``false`` / ``off`` / ``no``."""
    return _word("SNAPGEN_BNA_KERNEL", {"on": _ON, "off": _OFF}, "on") == "on"


def flex_compile() -> str:
    """``"auto"`` (unset / empty / ``auto``: compile flex_attention on CUDA only), ``"on"`` or ``"off"``."""
    return _word("SNAPGEN_FLEX_COMPILE", {"auto": ("", "auto"), "on": _ON[1:], "off": _OFF}, "auto")


def cpu_allocator() -> str:
    """``"default"`` (``SNAPGEN_CPU_ALLOCATOR=default``: leave glibc alone) or ``"retain"`` (unset/empty)."""
    return _word("SNAPGEN_CPU_ALLOCATOR", {"default": ("default",), "retain": ("",)}, "retain")


def world_size() -> int:
    """torchrun's ``WORLD_SIZE`` (1 when unset)."""
    return _int("WORLD_SIZE", 1, 1)


def local_rank() -> int:
    """torchrun's ``LOCAL_RANK`` (0 when unset)."""
    return _int("LOCAL_RANK", 0, 0)


def settings() -> dict[str, str | None]:
    """Each variable's raw value (``None`` when unset)."""
    return {name: os.environ.get(name) for name in VARIABLES}


# ---------------------------------------------------------------------------------------------------- describe
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return platform.processor() or platform.machine()


def _resolved() -> dict:
    """The parsed value of every variable; a bad value is reported, not raised (describe() must not fail)."""
    out = {}
    for key, fn in (("model_dir", model_dir), ("scene_detector_dir", scene_detector_dir),
                    ("image_encoder_dir", image_encoder_dir), ("cache_dir", cache_dir),
                    ("bna_kernel_enabled", bna_kernel_enabled), ("flex_compile", flex_compile),
                    ("cpu_allocator", cpu_allocator),
                    ("world_size", world_size), ("local_rank", local_rank)):
        try:
            v = fn()
            out[key] = str(v) if isinstance(v, Path) else v
        except ValueError as e:
            out[key] = f"error: {e}"
    return out


_NUMERICS_REPORTS: dict = {}


def register_report(name: str, fn) -> None:
    """A higher layer adds an entry to :func:`describe`'s ``numerics`` (``snapgen.attention`` registers
    ``"attention"`` when it is imported), so this module imports nothing of snapgen's."""
    _NUMERICS_REPORTS[name] = fn


def describe(attention_backend: str | None = None, build_kernel: bool = False) -> dict:
    """The settings in force, as a JSON-able dict: snapgen's variables (raw and parsed), versions, threads,
    the CPU, and under ``numerics`` what changes results -- the BNA backend and why
    (:func:`snapgen.attention.backend_report`; ``attention_backend`` is the model's ``bna_backend`` if
    known). The fused kernel is not built by this call unless ``build_kernel``; before its first use its
    status reads ``not-loaded-yet``."""
    import numpy as np
    import torch

    from ._version import __version__

    cuda = None
    if torch.cuda.is_available():
        cuda = {"version": torch.version.cuda, "devices": [torch.cuda.get_device_name(i)
                                                           for i in range(torch.cuda.device_count())]}
    return {
        "snapgen": __version__,
        "variables": settings(),
        "resolved": _resolved(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": cuda,
        "numerics": {
            **{name: fn(attention_backend, build=build_kernel) for name, fn in _NUMERICS_REPORTS.items()},
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
    }


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON atomically (a temporary file, then ``os.replace``)."""
    import json

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def record(path: str | os.PathLike, attention_backend=None, **extra) -> Path:
    """Write :func:`describe` (for the model's BNA backend setting, if known) plus ``extra`` keys to ``path``
    atomically, e.g. a run folder's ``env.json``."""
    return write_json(path, {**describe(attention_backend), **extra})
