"""Validation flow loss on a latent cache at fixed times and noise (comparable between models and runs)."""

from __future__ import annotations

import torch

__all__ = ["dfm_validation_losses", "dfm_validation_report", "validation_loss"]


@torch.no_grad()
def validation_loss(model, conditioning, cache: dict, variant: str | None = None, objective=None,
                    batch_size: int = 128, seed: int = 1234, per_sample: bool = False) -> float | torch.Tensor:
    """Mean flow-matching loss of ``model`` (at ``variant``) on a latent cache, at deterministic times and
    noise: times are the quantiles ``(i + 1/2) / N`` of the training time distribution (logit-normal +
    shift), dealt to samples by a seeded permutation; noise is drawn from ``seed``. Two models evaluated
    with the same cache and seed see exactly the same noised inputs, so differences are the models'.
    ``per_sample=True`` returns the ``(N,)`` float64 losses instead of their mean (for paired intervals:
    :func:`snapgen.eval.stats.paired_mean_difference`). A DFM objective: the stage-probability-weighted sum of
    :func:`dfm_validation_losses` (every stage at fixed tables)."""
    from ..flow import FlowMatchingLoss

    objective = objective or FlowMatchingLoss()
    if objective.name == "dfm":  # every stage Q at its own fixed table, weighted by stage_probs (the training mix)
        per_stage = dfm_validation_losses(model, conditioning, cache, variant, objective, batch_size, seed)
        rows = sum(p * per_stage[q] for q, p in enumerate(objective.stage_probs))
        return rows if per_sample else float(rows.sum()) / len(rows)
    times, noise = _fixed_draws(cache["latents"], objective, seed)
    losses = _losses(model, conditioning, cache, variant, objective, batch_size, times, noise)
    return losses if per_sample else float(losses.sum()) / len(losses)


def _quantile_times(n: int, mean: float, std: float, shift: float, g: torch.Generator) -> torch.Tensor:
    """The ``(i + 1/2) / n`` quantiles of ``shift(sigmoid(N(mean, std)))``, dealt out by a seeded permutation."""
    from ..flow.objective import shift_time

    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.special.ndtri(q) * std + mean
    return shift_time(torch.sigmoid(u), shift).float().clamp(1e-5, 1 - 1e-5)[torch.randperm(n, generator=g)]


def _fixed_draws(latents, objective, seed):
    g = torch.Generator().manual_seed(seed)
    times = _quantile_times(len(latents), objective.mean, objective.std, objective.shift_for(latents[:1].float()), g)
    return times, torch.randn(latents.shape, generator=g)


@torch.no_grad()
def dfm_validation_losses(model, conditioning, cache: dict, variant=None, objective=None, batch_size: int = 128,
                          seed: int = 1234) -> list[torch.Tensor]:
    """Per stage Q, the ``(N,)`` DFM losses at fixed tables: level Q at the quantile times of its distribution,
    earlier levels at the quantiles of theirs (own permutations), later levels not started; one packed noise
    (from ``seed``) shared by every stage."""
    from ..sampling.dfm import NOT_STARTED

    latents = cache["latents"]
    n = len(latents)
    g = torch.Generator().manual_seed(seed)
    shift = objective.shift_for(latents[:1].float())
    stage_times = _quantile_times(n, objective.mean, objective.std, shift, g)
    earlier = [_quantile_times(n, objective.earlier_logit_mean, objective.earlier_logit_std, 1.0, g)
               for _ in range(objective.levels - 1)]
    noise = torch.randn(objective.noise_shape(tuple(latents.shape)), generator=g)
    out = []
    for q in range(objective.levels):
        times = torch.full((n, objective.levels), NOT_STARTED)
        times[:, q] = stage_times
        for s in range(q):
            times[:, s] = earlier[s]
        out.append(_losses(model, conditioning, cache, variant, objective, batch_size, times, noise))
    return out


def dfm_validation_report(model, conditioning, cache: dict, objective) -> dict:
    """``{val_loss_<variant>_stage<q>, val_loss_<variant>}`` of every width: each stage's mean at its fixed tables
    and their ``stage_probs``-weighted sum (the training mix)."""
    out = {}
    for name in model.variants:
        stages = dfm_validation_losses(model, conditioning, cache, variant=name, objective=objective)
        out.update({f"val_loss_{name}_stage{q}": round(float(r.mean()), 6) for q, r in enumerate(stages)})
        out[f"val_loss_{name}"] = round(sum(p * float(r.mean()) for p, r in zip(objective.stage_probs, stages)), 6)
    return out


def _losses(model, conditioning, cache, variant, objective, batch_size, times, noise) -> torch.Tensor:
    from ..data.latent_cache import cache_features

    latents = cache["latents"]
    tables = cache.get("text_features") or [(cache["text_tokens"], cache["text_mask"])]  # one per text encoder
    n = len(latents)
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
    return torch.cat(losses)
