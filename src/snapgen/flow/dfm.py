"""Decomposable Flow Matching's objective [DFM Sec. 3.2, Alg. 1] (arXiv 2506.19839): flow matching applied
independently to each level of a Laplacian pyramid of the latent, one shared model.

Per batch: draw the stage ``Q`` from ``stage_probs``; the stage-Q level gets a logit-normal time (``logit_mean``,
``logit_std``, ``shift``, as plain flow matching), earlier levels cleaner logit-normal times
(``earlier_logit_mean``), later levels are *not started*: marked :data:`~snapgen.sampling.dfm.NOT_STARTED`, their
input zeroed by the model and left out of the loss. Each started level is noised on its own,
``x_s = (1 - t_s) X^s + t_s eps^s``, with target ``eps^s - X^s``; the per-level mean squared errors are summed
(not averaged) over the started levels, as the official code does.

**Conventions, converted here once.** snapgen's t = 1 is noise; the paper's t = 1 is data. The paper draws the
earlier levels at logit-normal location 1.5 (data side) and the official code (snap-research/elit
``loss.py: DFMSILoss``, already t = 1 noise) at ``sigmoid(N(0, 1) - 2.0)``. Here the location is a logit mean in
snapgen's convention: ``earlier_logit_mean = -1.5`` is the paper's 1.5 (the default), ``-2.0`` the code's.
Both draw ``Q`` once per batch with ``stage_probs`` (paper and code: 0.9 for the first, coarsest stage).

With one level the objective is plain flow matching, draw for draw (:class:`FlowMatchingLoss`'s times and
noise from the same generator, the same loss): tests/test_dfm.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling.dfm import NOT_STARTED
from ..utils.random import rand, randn
from .objective import FlowMatchingLoss, Noised, logit_normal_times
from .pyramid import Pyramid

__all__ = ["DFMTerms", "DecomposableFlowLoss", "PAPER_EARLIER_LOGIT_MEAN", "CODE_EARLIER_LOGIT_MEAN"]

PAPER_EARLIER_LOGIT_MEAN = -1.5  # the paper's location 1.5 (t = 1 data), in snapgen's t = 1 noise
CODE_EARLIER_LOGIT_MEAN = -2.0   # snap-research/elit loss.py: sigmoid(N(0, 1) - 2.0)


@dataclass
class DFMTerms:
    """One DFM loss evaluation: ``loss`` (scalar), ``per_sample`` (B,) summed over started levels, ``t`` (B,) the
    drawn stage's times (what per-time-bin logs bin by), ``stage`` Q, ``times`` (B, S) every level's time
    (NOT_STARTED for later levels), ``per_level`` (B, S) each level's mean squared error (0 where masked)."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    t: torch.Tensor
    stage: int
    times: torch.Tensor
    per_level: torch.Tensor


class DecomposableFlowLoss(FlowMatchingLoss):
    name = "dfm"

    """``__call__(model, x0, cond=...) -> (loss, per_sample, t)`` as :class:`FlowMatchingLoss`; :meth:`terms`
    returns the whole :class:`DFMTerms`. ``x0`` is the latent ``(B, C, H, W)`` (or ``(B, C, T, H, W)`` with a 3-D
    pyramid); the model is called on the packed pyramid state (:meth:`Pyramid.pack`, with one level the latent
    itself) with ``t`` of shape ``(B, S)``."""

    def __init__(self, levels: int = 2, stage_probs=None, mean: float = 0.0, std: float = 1.0,
                 shift: float | None = 1.0, earlier_logit_mean: float = PAPER_EARLIER_LOGIT_MEAN,
                 earlier_logit_std: float = 1.0, dims: int = 2, base_tokens: int = 256, patch_size: int = 2):
        super().__init__(mean, std, shift, base_tokens, patch_size)
        self.pyramid = Pyramid(levels, dims)
        if stage_probs is None:
            stage_probs = [1.0] if levels == 1 else [0.9] + [0.1 / (levels - 1)] * (levels - 1)
        probs = [float(p) for p in stage_probs]
        if len(probs) != levels or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"dfm.stage_probs must list {levels} non-negative probabilities summing to 1 (one per "
                             f"pyramid level, coarsest first; the paper's are [0.9, 0.1]), got {list(stage_probs)}")
        self.stage_probs = probs
        self.earlier_logit_mean, self.earlier_logit_std = float(earlier_logit_mean), float(earlier_logit_std)

    @property
    def levels(self) -> int:
        return self.pyramid.levels

    def draw_stage(self, generator: torch.Generator | None = None) -> int:
        """Q for one batch, from ``stage_probs`` (no draw with one level: plain flow matching's draws stay)."""
        if self.levels == 1:
            return 0
        u = float(rand(1, generator)[0])
        cum = 0.0
        for q, p in enumerate(self.stage_probs):
            cum += p
            if u < cum:
                return q
        return max(q for q, p in enumerate(self.stage_probs) if p > 0)

    def draw_times(self, n: int, stage: int, shift: float, generator=None, device=None) -> torch.Tensor:
        """``(n, S)`` level times for stage ``stage``: logit-normal at ``stage``, cleaner before, NOT_STARTED
        after. The stage's times are drawn first (with one level: exactly plain flow matching's draw)."""
        times = torch.full((n, self.levels), NOT_STARTED, device=device)
        times[:, stage] = logit_normal_times(n, self.mean, self.std, shift, generator, device)
        for s in range(stage):
            times[:, s] = logit_normal_times(n, self.earlier_logit_mean, self.earlier_logit_std, 1.0, generator,
                                             device)
        return times

    def noise_shape(self, x0_shape: tuple) -> tuple:
        return (x0_shape[0], *self.pyramid.packed_shape(x0_shape[1], x0_shape[2:]))

    def draw(self, x0_shape: tuple, generator: torch.Generator | None = None, device=None, stage: int | None = None):
        """``(times (B, S), packed eps)``: the stage Q (one per batch; ``stage`` given: not drawn), the level times,
        then the noise."""
        stage = self.draw_stage(generator) if stage is None else stage
        times = self.draw_times(x0_shape[0], stage, self.shift_for(torch.empty(x0_shape, device="meta")),
                                generator, device)
        return times, randn(self.noise_shape(x0_shape), generator, device=device)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Noised:
        """The packed noisy pyramid (levels not started: 0) at level times ``t`` ``(B, S)``, its packed target
        ``eps^s - X^s``; ``extra``: ``started`` (B, S) and the stage Q."""
        if t.dim() != 2 or t.shape != (x0.shape[0], self.levels):
            raise ValueError(f"DFM times are (B, {self.levels}) (one per pyramid level), got {tuple(t.shape)}")
        levels = self.pyramid.decompose(x0)
        started = t <= 1.0
        inputs, targets = [], []
        for s, (X, e) in enumerate(zip(levels, self.pyramid.unpack(eps))):
            shape = (-1, *([1] * (X.dim() - 1)))
            ts = t[:, s].clamp(max=1.0).to(X.dtype).reshape(shape)
            inputs.append(torch.where(started[:, s].reshape(shape), torch.lerp(X, e, ts), torch.zeros_like(X)))
            targets.append(e - X)
        return Noised(self.pyramid.pack(inputs), t, self.pyramid.pack(targets),
                      {"started": started, "stage": _stage_of(t)})

    def level_errors(self, v: torch.Tensor, noised: Noised, target: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S)`` mean squared error per level (0 for levels not started)."""
        target = noised.target if target is None else target
        per_level = [F.mse_loss(vs.float(), ts.float(), reduction="none").flatten(1).mean(1)
                     for vs, ts in zip(self.pyramid.unpack(v), self.pyramid.unpack(target))]
        per_level = torch.stack(per_level, dim=1)
        return torch.where(noised.extra["started"], per_level, torch.zeros_like(per_level))  # not x * mask: NaN-safe

    def error(self, v: torch.Tensor, noised: Noised, target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss: the started levels' mean squared errors, summed (Alg. 1; the official code)."""
        return self.level_errors(v, noised, target).sum(1)

    def mean_error(self, v: torch.Tensor, noised: Noised, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.error(v, noised, target).mean()

    def logged_time(self, noised: Noised) -> torch.Tensor:
        return noised.t[:, noised.extra["stage"]]

    def terms(self, model, x0: torch.Tensor, generator: torch.Generator | None = None, cond: dict | None = None,
              stage: int | None = None, times: torch.Tensor | None = None, eps: torch.Tensor | None = None,
              **cond_kw) -> DFMTerms:
        """One evaluation with everything in it (``stage`` / ``times`` / ``eps`` drawn when not given)."""
        if stage is None and times is None:
            stage = self.draw_stage(generator)
        if times is None:
            times = self.draw_times(x0.shape[0], stage, self.shift_for(x0), generator, x0.device)
        if eps is None:  # one draw of the whole packed state: with one level, plain flow matching's noise
            eps = randn(self.noise_shape(x0.shape), generator, device=x0.device, dtype=x0.dtype)
        n = self.noised(x0, times, eps)
        per_level = self.level_errors(model(n.x, n.t, {**(cond or {}), **cond_kw}), n)
        per_sample = per_level.sum(1)
        q = n.extra["stage"]
        return DFMTerms(per_sample.mean(), per_sample, times[:, q], q, times, per_level)

    def __call__(self, model, x0: torch.Tensor, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, cond: dict | None = None, **cond_kw):
        if t is not None and t.dim() == 1:  # a plain (B,) time: the stage-Q level's, earlier ones drawn
            stage = self.draw_stage(generator)
            times = self.draw_times(x0.shape[0], stage, 1.0, generator, x0.device)
            times[:, stage] = t
            t = times
        out = self.terms(model, x0, generator, cond, times=t, eps=eps, **cond_kw)
        return out.loss, out.per_sample, out.t


def _stage_of(times: torch.Tensor) -> int:
    """Q of a ``(B, S)`` time table: the last started level (the same for every row, as Alg. 1 draws it)."""
    started = (times <= 1.0).long()
    q = started.sum(1) - 1
    if bool((q != q[0]).any()) or bool((started.cummin(1).values != started).any()):
        raise ValueError("DFM times must start the same levels for the whole batch, coarsest first (one stage Q "
                         "per batch; later levels NOT_STARTED)")
    return int(q[0])
