"""K-DMD (SnapGen++ Sec. 3.2): distribution matching distillation to a few-step generator, guided by the
knowledge of a few-step teacher.

One training iteration (``KDMDLoss.__call__``), for a batch of captions:

1. pick the generator step ``k`` of the ``steps``-step schedule (the few-step sampler's grid of
   ``KDMDConfig.sampler_config()``, i.e. ``sampling_times(steps, shift)``, the one the export ships) with an
   RNG seeded by ``(seed, step)`` (identical on every rank); build the student's input ``x_t`` at ``t_k`` by
   backward simulation (the student rolled out without gradients from noise, re-noising with fresh noise);
2. the student predicts ``v``; ``x0_hat = x_t - t_k v``;
3. generator turn (every ``gen_every`` iterations):
   * DMD: re-noise ``x0_hat`` to ``tau ~ U[tau_low, tau_high]`` (shifted); real x0 from the teacher with
     CFG ``guidance``, fake x0 from the critic (no CFG), both without gradient;
     ``L_DMD = 0.5 || x0_hat - sg(x0_hat - (x0_fake - x0_real) / mean|x0_hat - x0_real|) ||^2``;
   * knowledge: the few-step teacher on the *same* ``x_t, t_k``: ``L_out = ||v - v_T'||^2`` and
     ``L_feat = ||phi(f) - f_T'||^2`` on the last block's tokens through the learned projector ``phi``;
   * ``L_gen = w_dmd L_DMD + w_out L_out + w_feat L_feat`` (paper: all weights 1);
4. critic turn (every iteration): flow matching of the critic on ``sg(x0_hat)``, at times drawn like tau
   (``critic_times="tau"``: the critic is trained where step 3 queries it) or DMD2's uniform ``U[0, 1]``
   (``critic_times="uniform"``, the default; on the 2-D toy tau was neutral to worse, docs/distillation.md).

The returned loss is ``L_gen + L_critic``; their gradients touch disjoint parameters (the scores in L_DMD are
computed without gradient, the critic's loss sees detached samples), so one backward pass serves both, and
the trainer's parameter groups ``generator`` and ``critic`` (each with its own lr, betas and gradient clip)
are DMD2's two optimizers (the generator's parameters simply get no gradient off-turn).
Plain DMD is the same with no few-step teacher. ``generator`` may be a :class:`snapgen.distill.dmd.BatchDraws`
(one part of a data-parallel global batch).

Models are Denoisers, called as ``model(x, t, cond)`` (velocity) and ``model(x, t, cond, features=("last",))``
(velocity, ``{"last": last-block features}``); ``cond``/``uncond`` are dicts of batch tensors. The teacher and
the few-step teacher may be :class:`snapgen.distill.teacher.Teacher` s with their own text side (an external
diffusers transformer): then ``teacher_cond``/``teacher_uncond`` and ``few_step_cond`` are their conditionings
of the same captions (default: the student's ``cond``/``uncond``), and the real score is
``teacher.velocity(x, tau, teacher_cond, guidance, teacher_uncond)`` (the teacher's own form of guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import SamplerConfig, cfg_velocity, make_sampler
from .dmd import backward_simulate, critic_loss, dmd_loss, randn, sample_tau
from .teacher import Teacher

__all__ = ["KDMDConfig", "KDMDLoss", "CRITIC_TIMES"]

CRITIC_TIMES = ("tau", "uniform")


@dataclass(frozen=True)
class KDMDConfig:
    steps: int = 4                 # generator steps
    shift: float = 3.0             # time shift of the generator schedule (paper: 3)
    guidance: float = 4.0          # teacher CFG in the DMD term (paper: 4)
    tau_low: float = 0.02          # re-noising range of the DMD term (DMD2)
    tau_high: float = 0.98
    gen_every: int = 5             # generator updated every N iterations, critic every iteration (paper: 5)
    dmd_weight: float = 1.0
    out_weight: float = 1.0        # knowledge terms (used when a few-step teacher is given)
    feat_weight: float = 1.0
    # "mse" (the paper's ||phi(f) - f_T||^2 on raw features) or "cosine" (1 - cos per token: scale-free, so
    # the feature term cannot outweigh L_out / L_DMD just because the teacher's residual stream is large)
    feat_loss: str = "mse"
    # the critic's training times: "uniform" (DMD2's U[0, 1], unshifted; the default) or "tau" (drawn like the
    # DMD term's tau: U[tau_low, tau_high], shifted by ``shift``, so the critic is trained where it is queried;
    # on the 2-D toy it was neutral to worse: docs/distillation.md "The critic's noise levels")
    critic_times: str = "uniform"
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.gen_every < 1:
            raise ValueError("steps and gen_every must be >= 1")
        if self.feat_loss not in ("mse", "cosine"):
            raise ValueError(f"feat_loss must be 'mse' or 'cosine', got {self.feat_loss!r}")
        if self.critic_times not in CRITIC_TIMES:
            raise ValueError(f"critic_times must be one of {list(CRITIC_TIMES)}, got {self.critic_times!r}")

    def critic_time_range(self) -> tuple[float, float, float]:
        """``(low, high, shift)`` of the critic's training times (:func:`snapgen.distill.dmd.critic_loss`)."""
        if self.critic_times == "tau":
            return self.tau_low, self.tau_high, self.shift
        return 0.0, 1.0, 1.0

    def sampler_config(self) -> SamplerConfig:
        """The distilled generator's sampler: ``steps`` few-step updates on ``sampling_times(steps, shift)``,
        without CFG (the distillation export's default sampler; K-DMD trains on its grid)."""
        return SamplerConfig(kind="few_step", steps=self.steps, shift=self.shift, guidance=1.0)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Feature-level distillation loss over tokens (last dim = channels): mean squared error, or the mean of
    ``1 - cos`` per token."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


class KDMDLoss:
    def __init__(self, cfg: KDMDConfig, student, critic, teacher, few_step_teacher=None, projector=None):
        self.cfg, self.student, self.critic, self.teacher = cfg, student, critic, teacher
        self.few_step_teacher, self.projector = few_step_teacher, projector
        self.times = make_sampler(cfg.sampler_config()).times()

    def step_index(self, step: int) -> int:
        return int(np.random.default_rng([self.cfg.seed, 4099, int(step)]).integers(self.cfg.steps))

    def is_generator_step(self, step: int) -> bool:
        return step % self.cfg.gen_every == 0

    def _student_velocity(self, cond):
        return lambda x, t: self.student(x, t, cond)

    def _real_velocity(self, x, t, cond, uncond):
        if isinstance(self.teacher, Teacher):
            return self.teacher.velocity(x, t, cond, self.cfg.guidance, uncond)
        return cfg_velocity(self.teacher, x, t, cond, uncond, self.cfg.guidance)

    def __call__(self, step: int, cond: dict, uncond: dict | None, shape: tuple, generator=None,
                 device=None, teacher_cond: dict | None = None, teacher_uncond: dict | None = None,
                 few_step_cond: dict | None = None) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        if teacher_cond is None:
            teacher_cond, teacher_uncond = cond, uncond
        B = shape[0]
        k = self.step_index(step)
        noise = randn(generator, shape, device=device)
        x_t = backward_simulate(self._student_velocity(cond), noise, self.times.to(noise.device), k, generator)
        t_k = torch.full((B,), float(self.times[k]), device=noise.device)
        gen_turn = self.is_generator_step(step)
        metrics = {"k": k}
        with torch.set_grad_enabled(gen_turn):
            v, feats = self.student(x_t, t_k, cond, features=("last",))
            feats = feats["last"]
            x0_hat = x_t - t_k.view(-1, *([1] * (x_t.dim() - 1))) * v
        loss = x0_hat.new_zeros(())
        if gen_turn:
            tau = sample_tau(B, c.tau_low, c.tau_high, c.shift, generator, noise.device)
            tau_b = tau.view(-1, *([1] * (x_t.dim() - 1)))
            with torch.no_grad():
                eps = randn(generator, shape, device=noise.device)
                x_tau = (1 - tau_b) * x0_hat.detach() + tau_b * eps
                v_real = self._real_velocity(x_tau, tau, teacher_cond, teacher_uncond)
                v_fake = self.critic(x_tau, tau, cond)
                x0_real, x0_fake = x_tau - tau_b * v_real, x_tau - tau_b * v_fake
            l_dmd, grad = dmd_loss(x0_hat, x0_real, x0_fake)
            loss = loss + c.dmd_weight * l_dmd
            metrics.update(loss_dmd=float(l_dmd.detach()), dmd_grad=float(grad.abs().mean()))
            if self.few_step_teacher is not None:
                with torch.no_grad():
                    v_t, f_t = self.few_step_teacher(x_t, t_k, cond if few_step_cond is None else few_step_cond,
                                                     features=("last",))
                    f_t = f_t["last"]
                l_out = F.mse_loss(v.float(), v_t.float())
                f_s = self.projector(feats) if self.projector is not None else feats
                l_feat = feature_loss(f_s.float(), f_t.float(), c.feat_loss)
                loss = loss + c.out_weight * l_out + c.feat_weight * l_feat
                metrics.update(loss_out=float(l_out.detach()), loss_feat=float(l_feat.detach()))
        l_critic = critic_loss(self.critic, x0_hat, cond, generator, *c.critic_time_range())
        metrics["loss_critic"] = float(l_critic.detach())
        self.last_parts = {"generator": loss, "critic": l_critic}  # for inspection (tests)
        return loss + l_critic, metrics
