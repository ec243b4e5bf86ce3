"""Calibration inputs of the k-means quantization (:mod:`snapgen.compress.quantize`): the ``(x_t, t, text, mask)``
batches its sensitivity analysis and bias/norm self-distillation run the fp32 and the quantized model on.

Two modes, :data:`CALIBRATION_MODES`:

* ``"sampler"`` (the default) -- the states the pipeline's *own* sampler visits. Seeded noise at the sampler's
  first time, then the fp32 (frozen) pipeline runs its sampler on the calibration prompts and every input the
  transformer receives is recorded: for a distilled (few-step) pipeline the ``x_t`` at each of its
  ``few_step_times`` (predict ``x0``, re-noise at the next time: DMD2's backward simulation), for an Euler
  (base) pipeline the states of its Euler grid at its steps and shift; with CFG each call holds the
  conditional and the null-text rows, as the model meets them. One batch per model call (step), so a batch is
  the size of one pipeline step. Why the default: a 4-step student is only ever evaluated at 4 times and on
  its own re-noised predictions, so an error budget spent on other times (and on ``x_t`` built from the
  final image and fresh noise) is spent where the deployed model never runs.
* ``"uniform"`` -- the earlier behaviour: the fp32 pipeline's final latents for the prompts, re-noised at
  uniform random times ``t ~ U(0.02, 0.98)`` (``x_t = (1-t) x0 + t eps``), ``batches`` batches of all prompts.

Seeded draws come from CPU generators and are moved to the pipeline's device (:mod:`snapgen.utils.random`).
"""

from __future__ import annotations

import torch

from ..utils.random import rand, randn

__all__ = ["CALIBRATION_MODES", "calibration_batches", "sampler_states", "uniform_batches"]

CALIBRATION_MODES = ("sampler", "uniform")


def check_mode(mode: str) -> str:
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_MODES)}, got {mode!r}")
    return mode


@torch.no_grad()
def sampler_states(pipe, prompts: list[str], seed: int = 0) -> list[tuple]:
    """Every transformer input of one seeded call ``pipe(prompts, seed=seed)``, in order: one
    ``(x_t, t, text, text_mask)`` per model evaluation (its current sampler, steps, shift, guidance and
    variant / adapter; CFG: 2B rows, conditional first). The pipeline's own loop is run, so these are exactly
    the states it visits."""
    states: list[tuple] = []

    def record(_module, args):
        if len(args) < 3 or not isinstance(args[2], dict):
            raise RuntimeError("calibration expects the transformer to be called as model(x, t, cond)")
        x, t, cond = args[:3]
        states.append((x.detach().clone(), t.detach().clone(), cond["text"].detach().clone(),
                       cond["text_mask"].detach().clone() if cond.get("text_mask") is not None else None))

    handle = pipe.transformer.register_forward_pre_hook(record)
    try:
        pipe(prompts, seed=seed, return_latents=True)
    finally:
        handle.remove()
    return states


@torch.no_grad()
def uniform_batches(pipe, prompts: list[str], batches: int = 4, seed: int = 0) -> list[tuple]:
    """The ``"uniform"`` mode: the pipeline's latents for ``prompts`` re-noised at uniform random times."""
    if getattr(pipe.transformer.config, "dfm_levels", 1) > 1:
        raise ValueError("calibration 'uniform' re-noises plain latents; a DFM model takes its packed pyramid "
                         "state: calibrate on its sampler's own inputs (calibration: sampler, the default)")
    x0 = pipe(prompts, seed=seed, return_latents=True)
    (text, mask), _ = pipe.encode_prompts(prompts)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(batches):
        t = rand((len(prompts),), g, device=x0.device, dtype=x0.dtype).clamp(0.02, 0.98)
        eps = randn(x0.shape, g, device=x0.device, dtype=x0.dtype)
        out.append(((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, t, text, mask))
    return out


def calibration_batches(pipe, prompts: list[str], batches: int = 4, seed: int = 0,
                        mode: str = "sampler") -> list[tuple]:
    """Data-free calibration batches for ``prompts`` (module docstring): ``mode="sampler"`` (default) -- the
    pipeline's own sampler states, one batch per step (``batches`` is unused); ``"uniform"`` -- ``batches``
    batches at uniform random times."""
    if check_mode(mode) == "sampler":
        return sampler_states(pipe, prompts, seed)
    return uniform_batches(pipe, prompts, batches, seed)
