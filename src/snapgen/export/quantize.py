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
                      finetune_steps: int = 100, progress=print, calibration: str = "sampler",
                      seed: int = 0) -> Path:
    """Quantize the pipeline's current variant (few-step adapter merged for distilled pipelines) and write a
    pipeline folder whose ``transformer/`` is the compact quantized file.

    ``calibration`` (:mod:`snapgen.compress.calibration`): ``"sampler"`` (default) calibrates and
    self-distils on the states the pipeline's own sampler visits from seeded noise (``seed``) -- a distilled
    pipeline's few-step times and re-noised predictions, a base pipeline's Euler grid -- because those are the
    only inputs the deployed model is run on; its sensitivity analysis covers up to 4 of those steps, spread
    from the first to the last. ``"uniform"``: the earlier recipe (final latents re-noised at uniform random
    times, sensitivity on the first batch)."""
    import shutil

    from .common import standalone_transformer

    out = Path(out_dir)
    batches = calibration_batches(pipe, prompts, seed=seed, mode=calibration)  # a bad mode: ValueError first
    model = standalone_transformer(pipe)
    model, report = quantize_model(model, batches, target_bits, finetune_steps, progress=progress,
                                   sensitivity_batches=4 if calibration == "sampler" else 1)
    report = {**report, "calibration": calibration, "calibration_batches": len(batches)}
    if calibration == "sampler":  # the step times calibrated on (uniform: random times in [0.02, 0.98])
        report["calibration_times"] = [round(float(b[1][0]), 6) if b[1].dim() == 1 else  # DFM: one per level
                                       [round(float(v), 6) for v in b[1][0]] for b in batches]
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
