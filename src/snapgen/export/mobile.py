"""Mobile exports: ExecuTorch (XNNPACK ``.pte``, runs here in ExecuTorch's Python runtime) and Core ML
(``.mlpackage``; conversion runs on Linux, prediction needs macOS).

Both use the device rewrite (:func:`snapgen.export.common.device_rewrite`: BNA as index gathers + one
batched dense attention, static shapes) and the same three graphs and manifest as the ONNX export.
Optional extra: ``pip install 'snapgen[device]'`` (executorch, coremltools).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..utils.quiet import quiet_imports
from .common import ExportedPipeline, write_export

__all__ = ["export_executorch", "ExecuTorchPipeline", "export_coreml", "EXECUTORCH_FORMAT", "COREML_FORMAT"]

EXECUTORCH_FORMAT = "snapgen-executorch"
COREML_FORMAT = "snapgen-coreml"


def _require(module: str, what: str):
    import importlib

    try:
        with quiet_imports():  # executorch imports torchao, whose import logs CUDA-extension failures
            return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the 'device' extra: pip install 'snapgen[device]' ({module} is "
                          f"missing)") from None


def _exported_program(module, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module.eval(), tuple(args))


# ----------------------------------------------------------------------------------------------- ExecuTorch
def _write_pte(module, args, path: Path, input_names, output_names) -> None:
    _require("executorch", "ExecuTorch export")
    with quiet_imports():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(_exported_program(module, args),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)


def export_executorch(pipe, out_dir: str | os.PathLike, resolution: tuple[int, int] | None = None,
                      progress: bool = True) -> Path:
    """Export ``pipe`` (current variant and mode) as three XNNPACK-lowered ExecuTorch programs."""
    _require("executorch", "ExecuTorch export")
    return write_export(pipe, out_dir, EXECUTORCH_FORMAT, ".pte", _write_pte, resolution, True, progress)


class ExecuTorchPipeline(ExportedPipeline):
    """Generate from an ``export_executorch`` folder with ExecuTorch's runtime (a real mobile runtime)."""

    format, suffix, command = EXECUTORCH_FORMAT, ".pte", "executorch"

    def __init__(self, directory: str | os.PathLike):
        _require("executorch", "the ExecuTorch runtime")
        super().__init__(directory)

    def _load(self, path: Path):
        with quiet_imports():
            from executorch.runtime import Runtime

        return Runtime.get().load_program(str(path)).load_method("forward")

    def _run(self, name, inputs):
        return list(self.graphs[name].execute(list(inputs.values())))


# -------------------------------------------------------------------------------------------------- Core ML
def palettize_clustered(model, ct):
    """Core ML palettization with snapgen's own k-means clusters. A quantized DiT (``snapgen quantize``) holds
    at most 16 (4-bit) or 256 (8-bit) distinct values per clustered weight, so coremltools' ``unique`` mode
    stores each as indices + a look-up table of exactly those centroids -- lossless, no re-clustering.
    Returns the palettized model and the number of weights palettized."""
    from coremltools.optimize.coreml import (OpPalettizerConfig, OptimizationConfig, get_weights_metadata,
                                             palettize_weights)

    meta = get_weights_metadata(model, weight_threshold=257)
    names = {name: OpPalettizerConfig(mode="unique", weight_threshold=257)
             for name, m in meta.items() if m.unique_values <= 256}
    if not names:
        return model, 0
    return palettize_weights(model, OptimizationConfig(op_name_configs=names)), len(names)


def _write_mlpackage(module, args, path: Path, input_names, output_names, palettize: bool = False) -> dict:
    ct = _require("coremltools", "Core ML export")
    from torch._decomp import core_aten_decompositions, get_decompositions

    ep = _exported_program(module, args)
    # Core ML has no fused addcmul/lerp: decompose them into multiply-adds (same values up to rounding)
    table = core_aten_decompositions()
    table.update(get_decompositions([torch.ops.aten.addcmul, torch.ops.aten.lerp]))
    ep = ep.run_decompositions(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                           compute_precision=ct.precision.FLOAT16)
        extra = {}
        if palettize:
            model, extra["palettized_weights"] = palettize_clustered(model, ct)
    model.save(str(path))
    return extra


def export_coreml(pipe, out_dir: str | os.PathLike, resolution: tuple[int, int] | None = None,
                  progress: bool = True) -> Path:
    """Export ``pipe`` as three Core ML ``.mlpackage`` programs (fp16 compute, iOS 17). Conversion works on
    Linux; running them needs macOS (coremltools' ``predict``), so there is no Linux runtime here."""
    _require("coremltools", "Core ML export")
    # a k-means quantized pipeline (snapgen quantize): its DiT weights become Core ML look-up tables
    quantized = hasattr(pipe.transformer, "_snapgen_quant_report")

    def writer(module, args, path, ins, outs):
        return _write_mlpackage(module, args, path, ins, outs, palettize=quantized and path.stem == "dit")

    return write_export(pipe, out_dir, COREML_FORMAT, ".mlpackage", writer, resolution, True, progress)
