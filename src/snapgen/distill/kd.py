"""Knowledge distillation from a teacher model (SnapGen++ Sec. 3.1; SnapGen's multi-level KD).

For a student width ``s`` on the noised batch ``(x_t, t)``:

    L_out  = || v_s - v_T ||^2                      output level (velocities)
    L_feat = || phi_s(f_s) - f_T ||^2                feature level: last block's tokens, learned projector phi_s
    L      = S(L_task, L_out + L_feat)

with SnapGen's timestep-aware scaling, per sample::

    S(L_task, L_kd) = alpha_t * L_task + (1 - alpha_t) * sg(|L_task| / |L_kd|) * L_kd,
    alpha_t = p_LN(t) / max p_LN

``p_LN`` is the density of the training times as they are drawn: ``shift(sigmoid(N(mean, std)))`` with the
run's time shift (``t = a s / (1 + (a - 1) s)``; stage 2 of the paper's recipe uses a = 3), so the weight peaks
where training times are really dense, not at the unshifted mode (issue 21: it used the unshifted density). The form of S comes from a secondary summary of
SnapGen (arXiv 2412.09619; ``../shared/research/papers.md`` §7d marks it unverified), and "alpha_t derived
from the logit-normal density" is implemented as the density normalised to 1 at its mode: where training
times are dense the task loss dominates; at the rarely-sampled ends (pure noise, nearly clean), the
teacher's signal dominates, rescaled to the task loss's magnitude (the ratio is not differentiated).
``scaling: none`` gives the plain sum ``L_task + L_out + L_feat`` for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["logit_normal_weight", "timestep_aware_scaling", "KnowledgeDistillationLoss"]


def _log_density(t: torch.Tensor, mean: float, std: float, shift: float) -> torch.Tensor:
    """log p(t) (up to a constant) of ``t = shift(s)``, ``logit(s) ~ N(mean, std)``: the inverse shift
    ``s = t / (a - (a - 1) t)`` and its Jacobian ``ds/dt = a / (a - (a - 1) t)^2``."""
    d = shift - (shift - 1) * t
    s = t / d
    logit = torch.log(s / (1 - s))
    return -((logit - mean) ** 2) / (2 * std**2) - torch.log(s * (1 - s)) + torch.log(shift / d**2)


def logit_normal_weight(t: torch.Tensor, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """``alpha_t``: the density of the (shifted) logit-normal training times at ``t``, divided by its maximum (in
    (0, 1], 1 at the mode)."""
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    t = t.double().clamp(1e-6, 1 - 1e-6)
    # the mode, found numerically once on a fine grid
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    log_max = _log_density(grid, mean, std, shift).max()
    return torch.exp(_log_density(t, mean, std, shift) - log_max).float().clamp(0, 1)


def timestep_aware_scaling(task: torch.Tensor, kd: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-sample ``alpha * task + (1 - alpha) * sg(|task| / |kd|) * kd`` (all shaped ``(B,)``)."""
    ratio = (task.detach().abs() / kd.detach().abs().clamp_min(1e-12))
    return alpha * task + (1 - alpha) * ratio * kd


class KnowledgeDistillationLoss(nn.Module):
    """Task + teacher distillation for one student model (any width of a supernetwork).

    ``teacher(x, t, teacher_cond, features=("last",))`` gives ``(v_T, {"last": f_T})`` (the Denoiser
    interface's feature tap); the student is called the same way with ``student_cond``. ``projectors`` maps a width name to its ``phi`` (trainable; not exported).
    """

    def __init__(self, teacher, projectors: dict[str, nn.Module], scaling: str = "snapgen",
                 out_weight: float = 1.0, feat_weight: float = 1.0, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        if scaling not in ("snapgen", "none"):
            raise ValueError(f"kd scaling must be 'snapgen' or 'none', got {scaling!r}")
        self.teacher = teacher
        self.projectors = nn.ModuleDict(projectors)
        self.scaling, self.out_weight, self.feat_weight = scaling, out_weight, feat_weight
        self.mean, self.std = mean, std

    @torch.no_grad()
    def teacher_targets(self, x_t, t, teacher_cond: dict | None = None, tap: str = "last", **cond_kw):
        v, f = self.teacher(x_t, t, {**(teacher_cond or {}), **cond_kw}, features=(tap,))
        return v.float(), f[tap].float()

    def per_width(self, width: str, v: torch.Tensor, f: torch.Tensor, target: torch.Tensor, v_t: torch.Tensor,
                  f_t: torch.Tensor, t: torch.Tensor, shift: float = 1.0) -> tuple[torch.Tensor, dict]:
        """The combined loss (scalar) of one width and its parts (floats); ``shift``: the time shift ``t`` was
        drawn with (the weight is the density of the times actually drawn)."""
        task = F.mse_loss(v.float(), target, reduction="none").flatten(1).mean(1)
        out = F.mse_loss(v.float(), v_t, reduction="none").flatten(1).mean(1)
        if f.shape[:2] != f_t.shape[:2]:
            raise ValueError(f"feature KD needs the same token grid: student {tuple(f.shape)}, teacher "
                             f"{tuple(f_t.shape)} (use a teacher with the same patch size and latent)")
        feat = F.mse_loss(self.projectors[width](f).float(), f_t, reduction="none").flatten(1).mean(1)
        kd = self.out_weight * out + self.feat_weight * feat
        if self.scaling == "snapgen":
            total = timestep_aware_scaling(task, kd, logit_normal_weight(t, self.mean, self.std, shift).to(task.device))
        else:
            total = task + kd
        return total.mean(), {"task": float(task.detach().mean()), "kd_out": float(out.detach().mean()),
                              "kd_feat": float(feat.detach().mean())}
