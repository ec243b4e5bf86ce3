""""One model, many devices": measure each sub-network's per-step latency on *this* machine and pick the
largest that fits a latency budget (``snapgen select``)."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["measure_step_latency", "select_variant"]


@torch.no_grad()
def measure_step_latency(model, variant: str, latent_hw: tuple[int, int], text_len: int = 32, images: int = 1,
                         cfg: bool = True, repeats: int = 7, warmup: int = 2) -> dict:
    """Median wall time of one sampling step (one denoiser call on ``images`` latents, doubled for CFG) of
    sub-network ``variant``; returns ``{"median_ms", "min_ms", "repeats"}``. The model's variant is restored."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    c = model.config
    p = next(model.parameters())
    B = images * (2 if cfg else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, c.in_channels, *latent_hw, generator=g).to(p)
    t = torch.full((B,), 0.5, device=p.device)
    text = torch.randn(B, text_len, c.text_dim, generator=g).to(p)
    previous, was_training = model.variant, model.training
    model.eval().set_variant(variant)
    try:
        for _ in range(warmup):
            model(x, t, {"text": text})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, t, {"text": text})
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.set_variant(previous)
        model.train(was_training)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "repeats": repeats}


def select_variant(latency_ms: dict[str, float], ratios: dict[str, float], budget_ms: float) -> str | None:
    """The widest variant whose latency is within ``budget_ms`` (``None`` if even the smallest is over)."""
    if budget_ms <= 0:
        raise ValueError(f"budget must be positive, got {budget_ms} ms")
    fitting = [n for n, ms in latency_ms.items() if ms <= budget_ms]
    return max(fitting, key=lambda n: ratios[n]) if fitting else None
