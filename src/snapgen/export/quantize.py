"""k-means quantization of a pipeline for deployment (``snapgen quantize``). The quantization itself lives
in :mod:`snapgen.compress.quantize` (re-exported here for one release); this module adds the pipeline step:
quantize the current variant and write a pipeline folder whose ``transformer/`` is the compact file."""

from __future__ import annotations

import os
from pathlib import Path

from ..compress.quantize import *  # noqa: F401,F403
from ..compress.quantize import __all__ as _core_all
from ..compress.quantize import calibration_batches, quantize_model, save_quantized

__all__ = [*_core_all, "quantize_pipeline"]


def quantize_pipeline(pipe, out_dir: str | os.PathLike, prompts: list[str], target_bits: float = 4.3,
                      finetune_steps: int = 100, progress=print) -> Path:
    """Quantize the pipeline's current variant (few-step adapter merged for distilled pipelines) and write a
    pipeline folder whose ``transformer/`` is the compact quantized file."""
    import shutil

    from .common import standalone_transformer

    out = Path(out_dir)
    calibration = calibration_batches(pipe, prompts)
    model = standalone_transformer(pipe)
    model, report = quantize_model(model, calibration, target_bits, finetune_steps, progress=progress)
    config = pipe.config.replace(adapters={}) if pipe.distilled and not pipe._base_mode else pipe.config
    if pipe._base_mode:  # the base model with its own sampler
        config = pipe.config.with_sampler(pipe.sampler_config()).replace(adapters={}, base_sampling={})
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    type(pipe)(model, pipe.conditioning, pipe.vae, config).save_pretrained(tmp)
    shutil.rmtree(tmp / "transformer")
    save_quantized(model, tmp / "transformer", {**report, "variant": pipe.transformer.variant})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
