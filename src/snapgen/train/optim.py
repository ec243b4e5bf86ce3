"""Optimizer of a run: one AdamW over the task's parameter groups, each with its own lr (scale), betas,
weight decay and gradient clip (:class:`snapgen.tasks.ParamGroup`, overridden by ``optim.groups.<name>``).

Each task group becomes two AdamW groups (weight decay on matrices; none on vectors and null embeddings),
in the task's module order, so a task with one group (flow, autoencoder) builds exactly the optimizer of
the single-group trainer (same state layout; old checkpoints resume). Clipping is per group, by the norm of
that group's gradients (DMD2 clips generator and critic separately); ``optim.clip_mode: global`` clips all
groups together by their joint norm with ``optim.grad_clip`` (the pre-group behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GroupState", "build_optimizer", "set_lr", "clip_gradients"]


@dataclass
class GroupState:
    name: str
    params: list[torch.Tensor]
    lr_scale: float
    clip: float


def build_optimizer(groups, params: dict[str, torch.Tensor], optim) -> tuple[torch.optim.Optimizer, list[GroupState]]:
    """``groups``: the task's checked :class:`ParamGroup` s; ``params``: ``{"<module>.<param>": tensor}`` of the
    trained parameters; ``optim``: the run's ``OptimConfig``."""
    overrides = dict(optim.groups or {})
    unknown = sorted(set(overrides) - {g.name for g in groups})
    if unknown:
        raise ValueError(f"optim.groups names {unknown}; this task's parameter groups are "
                         f"{[g.name for g in groups]}")
    adam_groups, states = [], []
    for g in groups:
        g = g.replace(**overrides.get(g.name, {}))
        if g.lr is not None and g.lr_scale is not None:
            raise ValueError(f"parameter group {g.name!r}: give lr or lr_scale, not both")
        lr_scale = g.lr / optim.lr if g.lr is not None else (1.0 if g.lr_scale is None else float(g.lr_scale))
        wd = optim.weight_decay if g.weight_decay is None else float(g.weight_decay)
        betas = optim.betas if g.betas is None else tuple(g.betas)
        eps = optim.eps if g.eps is None else float(g.eps)
        mods = set(g.modules)
        mine = [(n, p) for n, p in params.items() if n.split(".", 1)[0] in mods]
        decay = [p for n, p in mine if not (p.ndim < 2 or "null" in n)]
        no_decay = [p for n, p in mine if p.ndim < 2 or "null" in n]
        for ps, w in ((decay, wd), (no_decay, 0.0)):
            if ps:
                adam_groups.append({"params": ps, "weight_decay": w, "betas": betas, "eps": eps,
                                    "lr": optim.lr * lr_scale, "group": g.name})
        clip = optim.grad_clip if g.clip is None else float(g.clip)
        states.append(GroupState(g.name, [p for _, p in mine], lr_scale, clip))
    if not adam_groups:
        raise ValueError("the task has no trainable parameters")
    opt = torch.optim.AdamW(adam_groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    return opt, states


def set_lr(optimizer: torch.optim.Optimizer, states: list[GroupState], lr: float) -> None:
    """The schedule's ``lr`` times each group's scale."""
    scale = {s.name: s.lr_scale for s in states}
    for g in optimizer.param_groups:
        s = scale.get(g.get("group"), 1.0)
        g["lr"] = lr if s == 1.0 else lr * s


def clip_gradients(states: list[GroupState], optim) -> dict[str, float]:
    """Clip each group by its own norm (or all jointly with ``optim.clip_mode: global``); the norms before
    clipping: ``grad_norm`` (all groups) and, with several groups, ``grad_norm_<group>``."""
    def clip(ps, max_norm):
        return torch.nn.utils.clip_grad_norm_(ps, max_norm if max_norm > 0 else 1e30)

    if optim.clip_mode == "global" or len(states) == 1:
        out = {}
        if len(states) > 1:  # per-group norms, for the log only
            out = {f"grad_norm_{s.name}": float(torch.nn.utils.get_total_norm(
                [p.grad for p in s.params if p.grad is not None])) for s in states}
        max_norm = optim.grad_clip if optim.clip_mode == "global" else states[0].clip
        return {"grad_norm": float(clip([p for s in states for p in s.params], max_norm)), **out}
    norms = {s.name: float(clip(s.params, s.clip)) for s in states}
    return {"grad_norm": sum(v * v for v in norms.values()) ** 0.5, **{f"grad_norm_{k}": v for k, v in norms.items()}}
