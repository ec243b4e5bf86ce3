"""Validation flow loss on a latent cache at fixed times and noise (comparable between models and runs)."""

from __future__ import annotations

import torch

__all__ = ["validation_loss"]


@torch.no_grad()
def validation_loss(model, conditioning, cache: dict, variant: str | None = None, objective=None,
                    batch_size: int = 128, seed: int = 1234, per_sample: bool = False) -> float | torch.Tensor:
    """Mean flow-matching loss of ``model`` (at ``variant``) on a latent cache, at deterministic times and
    noise: times are the quantiles ``(i + 1/2) / N`` of the training time distribution (logit-normal +
    shift), dealt to samples by a seeded permutation; noise is drawn from ``seed``. Two models evaluated
    with the same cache and seed see exactly the same noised inputs, so differences are the models'.
    ``per_sample=True`` returns the ``(N,)`` float64 losses instead of their mean (for paired intervals:
    :func:`snapgen.eval.stats.paired_mean_difference`)."""
    from ..data.latent_cache import cache_features
    from ..flow import FlowMatchingLoss
    from ..flow.objective import shift_time

    objective = objective or FlowMatchingLoss()
    latents = cache["latents"]
    tables = cache.get("text_features") or [(cache["text_tokens"], cache["text_mask"])]  # one per text encoder
    n = len(latents)
    g = torch.Generator().manual_seed(seed)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.special.ndtri(q) * objective.std + objective.mean
    shift = objective.shift_for(latents[:1].float())
    times = shift_time(torch.sigmoid(u), shift).float().clamp(1e-5, 1 - 1e-5)[torch.randperm(n, generator=g)]
    noise = torch.randn(latents.shape, generator=g)
    device = next(model.parameters()).device
    was_training, cond_training = model.training, conditioning.training
    previous = getattr(model, "variant", "full")
    model.eval()
    conditioning.eval()
    if variant is not None:
        model.set_variant(variant)
    losses = []
    try:
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            cap = cache["caption_index"][sl]
            feats = cache_features(tables, cap, device)
            text, mask = conditioning(feats)
            x0 = latents[sl].float().to(device)
            loss, rows, _ = objective(model, x0, t=times[sl].to(device), eps=noise[sl].to(device),
                                   cond={"text": text, "text_mask": mask})
            losses.append(rows.detach().double().cpu())
    finally:
        if variant is not None:
            model.set_variant(previous)
        model.train(was_training)
        conditioning.train(cond_training)
    losses = torch.cat(losses)
    return losses if per_sample else float(losses.sum()) / n
