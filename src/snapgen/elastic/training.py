"""Elastic training: every step trains the full supernetwork plus sampled sub-networks (sandwich rule).

Per step, on *one* noised batch ``(x_t, t)`` shared by all widths::

    L = w_full * FM(full) + sum_s w_sub * [ FM(s) + lambda * || v_s - sg(v_full) ||^2 ]

* ``FM`` is the flow-matching loss ``|| v - (eps - x0) ||^2`` (SnapGen++ Eq. L_diff, for every width);
* the second term is in-place self-distillation toward the full network's stop-gradient velocity
  (SnapGen++ L_dist; BigNAS/US-Nets "in-place distillation");
* the sub-networks ``s`` are the smallest variant (always: the sandwich rule) plus ``num_random`` drawn
  uniformly from the others, by an RNG seeded with ``(seed, step)`` -- so every distributed rank trains
  the same sub-networks without communicating, and a resumed run redraws the same ones.

Weighting. The paper combines widths with an unverified "adaptive scaling". We keep the slimmable-network
convention -- each trained width contributes its own loss with weight 1 (gradients summed, one optimizer
step) -- because every width regresses the same target on the same scale, so equal weights give each width
an equal say and a weight needs no tuning per width. ``full_weight``/``subnet_weight``/``distill_weight``
are configurable; ``docs/elastic.md`` reports what was measured with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..flow.objective import FlowMatchingLoss, logit_normal_times
from ..utils.random import randn

__all__ = ["sample_subnetworks", "WidthWeights", "ElasticFlowLoss"]


def sample_subnetworks(variants: dict[str, float], step: int, seed: int = 0, num_random: int = 1) -> list[str]:
    """Sub-networks (besides ``full``) trained at ``step``: the smallest always, plus ``num_random`` of the
    others drawn uniformly without replacement. Deterministic in ``(seed, step)``; ordered by width."""
    subs = sorted((r, n) for n, r in variants.items() if n != "full")
    if not subs:
        return []
    smallest, others = subs[0][1], [n for _, n in subs[1:]]
    k = min(max(num_random, 0), len(others))
    rng = np.random.default_rng([int(seed), 8191, int(step)])
    picked = {others[i] for i in rng.choice(len(others), size=k, replace=False)} if k else set()
    return [n for _, n in subs if n == smallest or n in picked]


@dataclass(frozen=True)
class WidthWeights:
    full_weight: float = 1.0
    subnet_weight: float = 1.0
    distill_weight: float = 1.0


class ElasticFlowLoss:
    """Sandwich-rule elastic flow-matching loss for a ``ThreeStageDiT`` with ``elastic_variants``.

    ``__call__(model, x0, step, generator=..., cond=...)`` returns ``(loss, per_sample_full, t, metrics)`` where
    ``metrics`` holds ``fm_<variant>`` and ``kd_<variant>`` (floats) for the widths trained this step. The
    model is left at the full width.
    """

    def __init__(self, objective: FlowMatchingLoss | None = None, weights: WidthWeights = WidthWeights(),
                 num_random: int = 1, seed: int = 0):
        self.objective = objective or FlowMatchingLoss()  # its time distribution (logit-normal + shift)
        self.weights, self.num_random, self.seed = weights, num_random, seed

    def __call__(self, model, x0: torch.Tensor, step: int, generator: torch.Generator | None = None,
                 t: torch.Tensor | None = None, eps: torch.Tensor | None = None, cond: dict | None = None,
                 **cond_kw):
        cond = {**(cond or {}), **cond_kw}
        if not model.config.elastic_variants:
            raise ValueError("ElasticFlowLoss needs an elastic model (config.elastic_variants is empty)")
        o = self.objective
        if t is None and eps is None:  # the objective's draw: times first, then noise (DFM: a stage, level times)
            t, eps = o.draw(x0.shape, generator, x0.device)
            eps = eps.to(x0.dtype)
        if t is None:
            t = logit_normal_times(x0.shape[0], o.mean, o.std, o.shift_for(x0), generator, x0.device)
        if eps is None:
            eps = randn(o.noise_shape(x0.shape), generator, device=x0.device, dtype=x0.dtype)
        n = o.noised(x0, t, eps)  # the objective's model input and target (DFM: the packed pyramid)
        w = self.weights
        model.set_variant("full")
        v_full = model(n.x, n.t, cond).float()
        per_sample = o.error(v_full, n)
        loss = w.full_weight * per_sample.mean()
        metrics = {"fm_full": float(per_sample.detach().mean())}
        teacher = v_full.detach()
        try:
            for name in sample_subnetworks(model.variants, step, self.seed, self.num_random):
                model.set_variant(name)
                v = model(n.x, n.t, cond).float()
                fm, kd = o.mean_error(v, n), o.mean_error(v, n, target=teacher)
                loss = loss + w.subnet_weight * (fm + w.distill_weight * kd)
                metrics[f"fm_{name}"], metrics[f"kd_{name}"] = float(fm.detach()), float(kd.detach())
        finally:
            model.set_variant("full")
        t = o.logged_time(n)
        return loss, per_sample, t, metrics
