"""ONNX export of a text-to-image pipeline, and a runtime that generates with onnxruntime alone.

``export_onnx(pipe, out_dir, resolution=...)`` writes three static-shape graphs (``torch.onnx.export(...,
dynamo=True)``, opset 18) -- ``text.onnx`` (text encoder + the trained projection), ``dit.onnx`` (one
denoiser call of the pipeline's current variant, extracted, its few-step adapter merged; batch 2 with CFG),
``decoder.onnx`` -- plus the tokenizer, the unconditional tokens and ``export.json``
(:mod:`snapgen.export.common`). :class:`OnnxPipeline` runs them with the PyTorch pipeline's sampler code.

Large graphs: protobuf refuses messages over 2 GB, so a graph whose parameters exceed
``external_threshold`` (:data:`EXTERNAL_DATA_THRESHOLD`, 1 GiB, in the export dtype) is written with
``torch.onnx.export(..., external_data=True)``: the graph in ``<name>.onnx``, its weights in
``<name>.onnx.data`` beside it (onnxruntime reads them from the folder of the ``.onnx``; keep the two
together). The decision is per graph -- in practice the DiT of the full model (1.6B parameters, 6.4 GB in
fp32) -- and ``export.json`` lists it under ``external_data``. (torch itself switches to external data above
1.5 GiB of initializers; the lower threshold makes the choice ours, recorded, and testable.)

``dtype="fp16"``: the three graphs are exported from fp16 copies of the modules (fp16 weights and
activations; the few constants the model code computes in fp32 on purpose stay fp32); ``export.json``
records ``dtype`` and :class:`OnnxPipeline` feeds every graph its inputs in the graph's own input types
(read from the session), returning fp32 to the sampler, which runs in fp32 as in PyTorch. onnxruntime's CPU
provider runs these fp16 graphs (tested: close to fp32); fp16 mainly halves the files and targets GPU /
mobile providers with fp16 kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .common import ExportedPipeline, write_export

__all__ = ["export_onnx", "OnnxPipeline", "EXPORT_FORMAT", "EXTERNAL_DATA_THRESHOLD", "DTYPES"]

EXPORT_FORMAT = "snapgen-onnx"
EXTERNAL_DATA_THRESHOLD = 2**30  # bytes of parameters (in the export dtype) above which a graph's weights go external
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the 'export' extra: pip install 'snapgen[export]' ({e.name} "
                          f"is missing)") from None


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (what the graph's initializers will hold)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _onnx_writer(external_threshold: int):
    def write(module, args, path: Path, input_names, output_names) -> dict:
        import warnings

        external = parameter_bytes(module) > external_threshold
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18,
                              input_names=list(input_names), output_names=list(output_names), verbose=False,
                              external_data=external)
        data = path.with_name(path.name + ".data")  # torch's name for the weights file (also its own >1.5 GiB switch)
        return {"external_data": {path.name: data.name}} if data.is_file() else {}

    return write


def export_onnx(pipe, out_dir: str | os.PathLike, resolution: tuple[int, int] | None = None,
                rewrite: bool = False, progress: bool = True, dtype: str = "fp32",
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export ``pipe`` (its current variant and mode: distilled few-step or base) to ``out_dir``.

    ``dtype``: ``"fp32"`` or ``"fp16"`` (the graphs' weights and activations; the pipeline is not changed).
    ``external_threshold``: a graph whose parameters take more bytes is written with external data."""
    _require_onnx()
    if dtype not in DTYPES:
        raise ValueError(f"ONNX export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return write_export(pipe, out_dir, EXPORT_FORMAT, ".onnx", _onnx_writer(int(external_threshold)), resolution,
                        rewrite, progress, dtype=DTYPES[dtype])


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
        # a graph with external data reads <name>.onnx.data from the folder of the .onnx file
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _run(self, name, inputs):
        """Feed each input in the graph's own type (fp16 graphs take fp16), return float outputs as fp32."""
        session = self.graphs[name]
        types = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
        feeds = {k: v.numpy().astype(types[k]) if types.get(k) is not None else v.numpy() for k, v in inputs.items()}
        outs = session.run(None, feeds)
        return [torch.from_numpy(o.astype(np.float32) if o.dtype == np.float16 else o) for o in outs]
