"""ONNX export of a text-to-image pipeline, and a runtime that generates with onnxruntime alone.

``export_onnx(pipe, out_dir, resolution=...)`` writes three static-shape graphs (``torch.onnx.export(...,
dynamo=True)``, opset 18) -- ``text.onnx`` (text encoder + the trained projection), ``dit.onnx`` (one
denoiser call of the pipeline's current variant, extracted, its few-step adapter merged; batch 2 with CFG),
``decoder.onnx`` -- plus the tokenizer, the unconditional tokens and ``export.json``
(:mod:`snapgen.export.common`). :class:`OnnxPipeline` runs them with the PyTorch pipeline's sampler code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import ExportedPipeline, write_export

__all__ = ["export_onnx", "OnnxPipeline", "EXPORT_FORMAT"]

EXPORT_FORMAT = "snapgen-onnx"


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the 'export' extra: pip install 'snapgen[export]' ({e.name} "
                          f"is missing)") from None


def _write_onnx(module, args, path: Path, input_names, output_names) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=list(input_names),
                          output_names=list(output_names), verbose=False, external_data=False)


def export_onnx(pipe, out_dir: str | os.PathLike, resolution: tuple[int, int] | None = None,
                rewrite: bool = False, progress: bool = True) -> Path:
    """Export ``pipe`` (its current variant and mode: distilled few-step or base) to ``out_dir``."""
    _require_onnx()
    return write_export(pipe, out_dir, EXPORT_FORMAT, ".onnx", _write_onnx, resolution, rewrite, progress)


class OnnxPipeline(ExportedPipeline):
    """Generate from an ``export_onnx`` folder with onnxruntime (no snapgen model code involved)."""

    format, suffix, command = EXPORT_FORMAT, ".onnx", "onnx"

    def __init__(self, directory: str | os.PathLike, threads: int = 0):
        _require_onnx()
        self.threads = threads
        super().__init__(directory)

    def _load(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _run(self, name, inputs):
        outs = self.graphs[name].run(None, {k: v.numpy() for k, v in inputs.items()})
        return [torch.from_numpy(o) for o in outs]
