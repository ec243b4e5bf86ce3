"""Tests of the flow-matching objective and samplers (``snapgen.flow``).

Convention under test (docs/conventions.md): t in [0, 1], t = 1 is noise, ``x_t = (1 - t) x0 + t eps``,
``v = eps - x0``, ``x0 = x_t - t v``, ``eps = x_t + (1 - t) v``; CFG ``v = v_u + w (v_c - v_u)``; time shift
``t' = s t / (1 + (s - 1) t)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from snapgen.flow import (
    FlowMatchingLoss,
    cfg_velocity,
    euler_sample,
    few_step_sample,
    interpolate,
    logit_normal_times,
    loss_per_time_bin,
    resolution_shift,
    sampling_times,
    shift_time,
    time_bins,
    velocity_target,
    x0_from_velocity,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logit(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return torch.log(t) - torch.log1p(-t)


# --------------------------------------------------------------------------------------------------
# 1. Conventions: interpolation, velocity, recovery of x0 and eps
# --------------------------------------------------------------------------------------------------

def test_interpolate_endpoints_and_midpoint():
    g = _gen(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    torch.testing.assert_close(interpolate(x0, eps, torch.tensor(0.0)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.tensor(1.0)), eps)
    torch.testing.assert_close(interpolate(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)
    torch.testing.assert_close(velocity_target(x0, eps), eps - x0)


def test_interpolate_per_sample_time_broadcast():
    g = _gen(1)
    B = 4
    x0, eps = torch.randn(B, 3, 6, 7, generator=g), torch.randn(B, 3, 6, 7, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x_t = interpolate(x0, eps, t)
    assert x_t.shape == x0.shape
    for i in range(B):  # each sample uses its own time, not someone else's
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x0[i] + t[i] * eps[i])
    # tokens (B, N, D) too
    x0s, epss = torch.randn(B, 5, 8, generator=g), torch.randn(B, 5, 8, generator=g)
    xs = interpolate(x0s, epss, t)
    torch.testing.assert_close(xs, (1 - t)[:, None, None] * x0s + t[:, None, None] * epss)


def test_recover_x0_and_eps_from_velocity():
    g = _gen(2)
    B = 5
    x0, eps = torch.randn(B, 2, 4, 4, generator=g), torch.randn(B, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    x_t = interpolate(x0, eps, t)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, atol=1e-6, rtol=1e-5)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t + (1 - tb) * v, eps, atol=1e-6, rtol=1e-5)
    # scalar time
    x_half = interpolate(x0, eps, torch.tensor(0.5))
    torch.testing.assert_close(x0_from_velocity(x_half, v, torch.tensor(0.5)), x0, atol=1e-6, rtol=1e-5)
    # per-sample t is not applied as a single scalar: a wrong time gives a wrong x0
    assert not torch.allclose(x0_from_velocity(x_t, v, t.flip(0)), x0, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# 2. Time shift
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.5, 1.0, 1.5, 2.0, 3.0, math.sqrt(3.0), 7.0])
def test_shift_time_fixed_points_and_monotone(s):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ts = shift_time(t, s)
    assert ts[0] == 0.0
    assert abs(float(ts[-1]) - 1.0) < 1e-12
    assert torch.all(ts[1:] > ts[:-1])  # strictly increasing
    # closed form; equivalently the odds are multiplied by s: logit(t') = logit(t) + log s
    torch.testing.assert_close(ts, s * t / (1 + (s - 1) * t))
    inner = t[1:-1]
    torch.testing.assert_close(_logit(shift_time(inner, s)), _logit(inner) + math.log(s))
    if s > 1:
        assert torch.all(shift_time(inner, s) > inner)  # toward noise
    elif s < 1:
        assert torch.all(shift_time(inner, s) < inner)
    else:
        assert torch.equal(shift_time(inner, s), inner)
    # float32 tensors and python floats work too
    t32 = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_time(t32, s), torch.tensor([0.0, s / (1 + s), 1.0]))
    assert shift_time(0.5, s) == pytest.approx(s / (1 + s))


def test_shift_time_known_values_and_composition():
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.25, 3.0) == pytest.approx(0.5)
    t = torch.rand(100, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(shift_time(shift_time(t, 2.0), 1.5), shift_time(t, 3.0))
    torch.testing.assert_close(shift_time(shift_time(t, 4.0), 0.25), t)  # inverse shift


@pytest.mark.parametrize("bad", [0.0, -1.0, -3.0])
def test_shift_time_rejects_nonpositive(bad):
    with pytest.raises(ValueError):
        shift_time(torch.tensor([0.5]), bad)
    with pytest.raises(ValueError):
        sampling_times(4, bad)


def test_resolution_shift():
    assert resolution_shift(256) == pytest.approx(1.0)
    assert resolution_shift(1024) == pytest.approx(2.0)
    assert resolution_shift(4096) == pytest.approx(4.0)
    assert resolution_shift(4096, base_tokens=1024) == pytest.approx(2.0)
    assert resolution_shift(64) == pytest.approx(0.5)
    for bad in [(0, 256), (-4, 256), (256, 0)]:
        with pytest.raises(ValueError):
            resolution_shift(*bad)
    # FlowMatchingLoss(shift=None) uses the latent's token count: 64x64 latent, patch 2 -> 1024 tokens
    loss = FlowMatchingLoss(shift=None, base_tokens=256, patch_size=2)
    assert loss.shift_for(torch.zeros(1, 4, 64, 64)) == pytest.approx(2.0)
    assert loss.shift_for(torch.zeros(1, 4, 32, 32)) == pytest.approx(1.0)
    assert FlowMatchingLoss(shift=3.0).shift_for(torch.zeros(1, 4, 64, 64)) == 3.0


# --------------------------------------------------------------------------------------------------
# 3. Logit-normal training times
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_times_distribution(m, s):
    n = 100_000
    t = logit_normal_times(n, mean=m, std=s, generator=_gen(10))
    assert t.shape == (n,)
    assert torch.all((t > 0) & (t < 1))
    z = _logit(t)
    # standard errors: s / sqrt(n) ~ 0.005 for the mean, ~0.0035 for the std
    assert abs(float(z.mean()) - m) < 0.02
    assert abs(float(z.std()) - s) < 0.02
    # Kolmogorov-Smirnov distance to the logit-normal CDF Phi((logit t - m) / s)
    zs, _ = torch.sort(z)
    cdf = 0.5 * (1 + torch.erf((zs - m) / (s * math.sqrt(2))))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((emp - cdf).abs(), (emp - 1 / n - cdf).abs()).max())
    assert ks < 0.01  # the 1% critical value is ~0.005 at this n
    # and a coarse histogram of t against the exact bin probabilities
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)[1:-1]
    probs_cdf = 0.5 * (1 + torch.erf((_logit(edges) - m) / (s * math.sqrt(2))))
    probs = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), probs_cdf,
                                  torch.ones(1, dtype=torch.float64)]))
    hist = torch.bincount(time_bins(t, 10), minlength=10).double() / n
    torch.testing.assert_close(hist, probs, atol=0.006, rtol=0)


def test_logit_normal_times_shift():
    n, m, s, a = 50_000, 0.3, 1.1, 3.0
    unshifted = logit_normal_times(n, mean=m, std=s, generator=_gen(11))
    shifted = logit_normal_times(n, mean=m, std=s, shift=a, generator=_gen(11))
    # same draw, then shifted (up to the final clamp to [eps, 1 - eps])
    torch.testing.assert_close(shifted, shift_time(unshifted, a).clamp(1e-5, 1 - 1e-5), atol=1e-6, rtol=1e-6)
    assert float(shifted.mean()) > float(unshifted.mean()) + 0.1  # pushed toward noise
    z = _logit(shifted)  # the shift adds log(a) to the logit
    assert abs(float(z.mean()) - (m + math.log(a))) < 0.03
    assert abs(float(z.std()) - s) < 0.03


def test_logit_normal_times_in_open_interval_and_reproducible():
    t = logit_normal_times(20_000, mean=0.0, std=20.0, generator=_gen(12))  # many would round to 0 or 1
    assert float(t.min()) >= 1e-5 - 1e-12 and float(t.max()) <= 1 - 1e-5 + 1e-7
    assert torch.all((t > 0) & (t < 1))
    a = logit_normal_times(1000, mean=0.2, std=0.9, shift=2.0, generator=_gen(13))
    b = logit_normal_times(1000, mean=0.2, std=0.9, shift=2.0, generator=_gen(13))
    c = logit_normal_times(1000, mean=0.2, std=0.9, shift=2.0, generator=_gen(14))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------------------------------
# 4. Loss per time bin
# --------------------------------------------------------------------------------------------------

def test_time_bins_and_loss_per_time_bin():
    t = torch.tensor([0.05, 0.15, 0.45, 0.55, 0.99, 1.0, 0.0, 0.41])
    assert time_bins(t, 5).tolist() == [0, 0, 2, 2, 4, 4, 0, 2]
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 10.0])
    out = loss_per_time_bin(loss, t, n_bins=5)
    assert len(out) == 5
    sums, counts = zip(*out)
    assert list(counts) == [3, 0, 3, 0, 2]
    assert list(sums) == pytest.approx([3.5, 0.0, 17.0, 0.0, 11.0])
    assert all(isinstance(s, float) and isinstance(c, int) for s, c in out)
    # totals are preserved, and autograd tensors are accepted
    lg = loss.clone().requires_grad_(True)
    out2 = loss_per_time_bin(lg * 2, t, n_bins=2)
    assert [c for _, c in out2] == [5, 3]
    assert sum(s for s, _ in out2) == pytest.approx(2 * float(loss.sum()))
    assert out2[0][0] == pytest.approx(2 * (1 + 2 + 3 + 0.5 + 10))


# --------------------------------------------------------------------------------------------------
# 5. FlowMatchingLoss
# --------------------------------------------------------------------------------------------------

def _batch(seed=20, shape=(6, 3, 4, 4)):
    g = _gen(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g), torch.rand(shape[0], generator=g)


def test_flow_loss_oracle_is_zero():
    x0, eps, t = _batch()
    loss_fn = FlowMatchingLoss()
    loss, per_sample, t_out = loss_fn(lambda x_t, tt, cond=None: eps - x0, x0, t=t, eps=eps)
    assert float(loss) == 0.0 and per_sample.shape == (6,) and torch.equal(t_out, t)

    # an oracle that must actually read x_t and t: v = (eps - x_t) / (1 - t), from eps = x_t + (1 - t) v
    def oracle_from_xt(x_t, tt, cond=None):
        return (eps - x_t) / (1 - tt).view(-1, 1, 1, 1)

    t_in = t.clamp(max=0.95)
    loss, per_sample, _ = loss_fn(oracle_from_xt, x0, t=t_in, eps=eps)
    assert float(loss) < 1e-10
    # likewise v = (x_t - x0) / t
    loss, _, _ = loss_fn(lambda x_t, tt, cond=None: (x_t - x0) / tt.view(-1, 1, 1, 1), x0, t=t.clamp(min=0.05), eps=eps)
    assert float(loss) < 1e-10
    # with sampled times too
    loss, _, t_s = loss_fn(lambda x_t, tt, cond=None: (x_t - x0) / tt.view(-1, 1, 1, 1), x0, eps=eps, generator=_gen(0))
    assert float(loss) < 1e-8 and torch.all((t_s > 0) & (t_s < 1))


def test_flow_loss_zero_model_and_per_sample():
    x0, eps, t = _batch(21)
    loss, per_sample, _ = FlowMatchingLoss()(lambda x_t, tt, cond=None: torch.zeros_like(x_t), x0, t=t, eps=eps)
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())
    torch.testing.assert_close(per_sample, ((eps - x0) ** 2).flatten(1).mean(1))
    # a model predicting the wrong sign (x0 - eps) has loss 4 mean((eps - x0)^2)
    loss_neg, _, _ = FlowMatchingLoss()(lambda x_t, tt, cond=None: x0 - eps, x0, t=t, eps=eps)
    torch.testing.assert_close(loss_neg, 4 * ((eps - x0) ** 2).mean())


def test_flow_loss_sampling_reproducible_and_passes_cond():
    x0, eps, _ = _batch(22)
    seen = {}

    def model(x_t, t, cond):
        seen.update(x_t=x_t, t=t, **cond)
        return torch.zeros_like(x_t)

    y = torch.arange(6)
    loss_fn = FlowMatchingLoss(mean=0.2, std=0.7, shift=None)  # 4x4 latent, patch 2 -> 4 tokens: shift 1/8
    _, _, t1 = loss_fn(model, x0, eps=eps, generator=_gen(5), cond={"y": y}, scale=2.0)  # both forms merge
    assert seen["y"] is y and seen["scale"] == 2.0
    torch.testing.assert_close(seen["x_t"], interpolate(x0, eps, t1))
    torch.testing.assert_close(seen["t"], t1)
    # with eps given, the times are exactly the ones logit_normal_times draws from the generator
    expected = logit_normal_times(6, 0.2, 0.7, shift=resolution_shift(4, 256), generator=_gen(5))
    torch.testing.assert_close(t1, expected)
    # fully seeded (times and noise) calls are reproducible
    l_a, _, t_a = loss_fn(model, x0, generator=_gen(6), y=y, scale=1.0)
    l_b, _, t_b = loss_fn(model, x0, generator=_gen(6), y=y, scale=1.0)
    assert torch.equal(t_a, t_b) and torch.equal(l_a, l_b)


def test_flow_loss_gradients_reach_model():
    torch.manual_seed(0)
    D = 8
    lin = nn.Linear(D, D)
    g = _gen(23)
    x0, eps, t = torch.randn(16, D, generator=g), torch.randn(16, D, generator=g), torch.rand(16, generator=g)
    loss, _, _ = FlowMatchingLoss()(lambda x_t, tt, cond=None: lin(x_t), x0, t=t, eps=eps)
    loss.backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    assert float(lin.weight.grad.abs().sum()) > 0
    # same gradient as the loss written out by hand
    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    manual = ((x_t @ w.T + b - (eps - x0)) ** 2).mean()
    manual.backward()
    torch.testing.assert_close(loss.detach(), manual.detach())
    torch.testing.assert_close(lin.weight.grad, w.grad)
    torch.testing.assert_close(lin.bias.grad, b.grad)


# --------------------------------------------------------------------------------------------------
# 6. Toy problem: learn a 2-D Gaussian mixture with FlowMatchingLoss, sample it with euler_sample
# --------------------------------------------------------------------------------------------------

TOY_K, TOY_R, TOY_STD = 8, 2.5, 0.2


def _toy_centres() -> torch.Tensor:
    ang = torch.arange(TOY_K, dtype=torch.float32) * (2 * math.pi / TOY_K)
    return torch.stack([TOY_R * ang.cos(), TOY_R * ang.sin()], 1)


def _toy_data(n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, TOY_K, (n,), generator=g)
    return _toy_centres()[idx] + TOY_STD * torch.randn(n, 2, generator=g)


class _ToyVelocity(nn.Module):
    """MLP on [x, t, sin(k pi t), cos(k pi t)] -> v."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        f = torch.tensor([1.0, 2.0], dtype=x.dtype) * math.pi
        return self.net(torch.cat([x, t, torch.sin(t * f), torch.cos(t * f)], 1))


def _near_mode_fraction(x: torch.Tensor) -> float:
    d = (x[:, None] - _toy_centres()[None]).norm(dim=-1).min(1).values
    return float((d < 3 * TOY_STD).float().mean())


def test_toy_gaussian_mixture_is_learned_and_sampled():
    torch.manual_seed(0)
    model = _ToyVelocity()
    steps = 1500
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    loss_fn = FlowMatchingLoss()
    g = _gen(0)
    first = None
    for _ in range(steps):
        loss, _, _ = loss_fn(model, _toy_data(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        first = loss.item() if first is None else first

    model.eval()
    noise = torch.randn(4000, 2, generator=_gen(1))
    out = euler_sample(model, noise, sampling_times(50))
    assert out.shape == noise.shape and torch.isfinite(out).all()

    # mixture of K >= 3 equally weighted modes on a circle: mean 0, covariance (R^2 / 2 + std^2) I
    var = TOY_R ** 2 / 2 + TOY_STD ** 2
    ref_cov = var * torch.eye(2)
    mean, cov = out.mean(0), torch.cov(out.T)
    assert float((mean).abs().max()) < 0.15, mean
    assert float((cov - ref_cov).abs().max()) < 0.1 * var, cov
    # the noise we started from is far from the data's statistics and from the modes
    assert float((torch.cov(noise.T) - ref_cov).abs().max()) > 0.5 * var
    near = _near_mode_fraction(out)
    assert near > 0.8, near  # data itself: ~0.99
    assert _near_mode_fraction(noise) < 0.2
    # every mode is populated (no mode collapse): each gets at least half its share
    mode = (out[:, None] - _toy_centres()[None]).norm(dim=-1).argmin(1)
    counts = torch.bincount(mode, minlength=TOY_K)
    assert int(counts.min()) > 0.5 * len(out) / TOY_K, counts
    assert loss.item() < first


def test_point_mass_oracle_is_sampled_exactly():
    """For data = a single point c, the exact velocity is v = (x - c) / t; its trajectories are straight lines
    so Euler (any schedule) and the few-step sampler (any noise) both land exactly on c."""
    c = torch.tensor([[1.5, -2.0, 0.25]])

    def v(x, t):
        assert t.shape == (x.shape[0],)
        return (x - c) / t[:, None]

    noise = torch.randn(10, 3, generator=_gen(30))
    for times in (sampling_times(1), sampling_times(3, shift=3.0), sampling_times(7, shift=0.5)):
        torch.testing.assert_close(euler_sample(v, noise, times), c.expand(10, 3), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(few_step_sample(v, noise, times, generator=_gen(0)), c.expand(10, 3),
                                   atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# 7. Parity with diffusers' FlowMatchEulerDiscreteScheduler
# --------------------------------------------------------------------------------------------------

try:
    from diffusers import FlowMatchEulerDiscreteScheduler
except ImportError:  # only the parity tests need diffusers
    FlowMatchEulerDiscreteScheduler = None

needs_diffusers = pytest.mark.skipif(FlowMatchEulerDiscreteScheduler is None, reason="diffusers not installed")


def _make_velocity(seed: int = 40, C: int = 4):
    """A deterministic, nonlinear velocity f(x, t) for x (B, C, H, W) and t either (B,) or a scalar."""
    g = _gen(seed)
    A = torch.randn(C, C, generator=g) / math.sqrt(C)
    Bm = torch.randn(C, C, generator=g) / math.sqrt(C)
    b = torch.randn(C, generator=g)

    def f(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        h = torch.tanh(torch.einsum("dc,bchw->bdhw", A, x) + t * b.view(1, -1, 1, 1))
        return torch.einsum("dc,bchw->bdhw", Bm, h) + (1 - t) * x * 0.5 + torch.sin(3 * t)

    return f


def _diffusers_loop(scheduler, f, noise, generator=None):
    x = noise
    for ts in scheduler.timesteps:
        v = f(x, ts / scheduler.config.num_train_timesteps)
        x = scheduler.step(v, ts, x, generator=generator).prev_sample
    return x


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 20])
def test_euler_sample_matches_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(n)
    f = _make_velocity()
    noise = torch.randn(3, 4, 5, 5, generator=_gen(41))
    times = sched.sigmas.clone()  # diffusers' schedule (n + 1 sigmas ending at 0), fed to our sampler
    assert len(times) == n + 1 and float(times[0]) == pytest.approx(1.0) and float(times[-1]) == 0.0
    # the relation our convention relies on: timestep = 1000 * t, with t the sigma (noise level)
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)
    ours = euler_sample(f, noise, times)
    theirs = _diffusers_loop(sched, f, noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if n > 1:  # and the comparison is not vacuous: a different schedule gives a different result
        assert not torch.allclose(euler_sample(f, noise, sampling_times(n, shift=shift * 2)), theirs, atol=1e-3)


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("n", [1, 4, 20])
def test_sampling_times_match_diffusers_custom_sigmas(n, shift):
    # In diffusers 0.42 ``set_timesteps(sigmas=...)`` takes the given sigmas, applies the *same* shift
    # s*t/(1+(s-1)t) as its own schedule (use_dynamic_shifting=False), sets timesteps = 1000 * sigmas and
    # appends a terminal 0. So for unshifted sigmas linspace(1, 0, n + 1)[:-1]:
    #     scheduler.sigmas == shift_time(linspace(1, 0, n + 1), shift) == sampling_times(n, shift).
    # (Its *default* schedule is different: linspace(1, shift(1/1000)) shifted again, so it never reaches
    # our grid exactly; test_euler_sample_matches_diffusers feeds that schedule to our sampler instead.)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1].tolist())
    ours = sampling_times(n, shift)
    torch.testing.assert_close(sched.sigmas, ours, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sched.timesteps, ours[:-1] * 1000, atol=1e-3, rtol=1e-6)
    # and sampling with either gives the same samples
    f = _make_velocity(42)
    noise = torch.randn(2, 4, 3, 3, generator=_gen(43))
    torch.testing.assert_close(euler_sample(f, noise, ours), _diffusers_loop(sched, f, noise), atol=1e-5, rtol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_few_step_sample_matches_diffusers_stochastic(n, shift):
    # diffusers' stochastic_sampling step: x0 = x - sigma v; x = (1 - sigma_next) x0 + sigma_next * randn(...)
    # drawing randn(sample.shape, generator) each step; with equally seeded generators both draw the same noise
    # (diffusers also draws at the last step, where it is multiplied by sigma_next = 0).
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, stochastic_sampling=True)
    sched.set_timesteps(n)
    f = _make_velocity(44)
    noise = torch.randn(3, 4, 4, 4, generator=_gen(45))
    ours = few_step_sample(f, noise, sched.sigmas.clone(), generator=_gen(7))
    theirs = _diffusers_loop(sched, f, noise, generator=_gen(7))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if n > 1:  # fresh noise matters: another seed gives another sample
        other = few_step_sample(f, noise, sched.sigmas.clone(), generator=_gen(8))
        assert not torch.allclose(ours, other, atol=1e-3)


def test_few_step_sample_hand_written_loop():
    f = _make_velocity(46)
    noise = torch.randn(2, 4, 3, 3, generator=_gen(47))
    times = sampling_times(3, shift=2.0)
    g = _gen(9)
    x = noise
    for i in range(3):
        t, tn = float(times[i]), float(times[i + 1])
        x0 = x - t * f(x, torch.full((2,), t))
        x = (1 - tn) * x0 + tn * torch.randn(x.shape, generator=g) if tn > 0 else x0
    torch.testing.assert_close(few_step_sample(f, noise, times, generator=_gen(9)), x)
    # one step from t = 1 is the x0 prediction noise - v
    one = few_step_sample(f, noise, sampling_times(1))
    torch.testing.assert_close(one, noise - f(noise, torch.ones(2)))


# --------------------------------------------------------------------------------------------------
# 8. Classifier-free guidance
# --------------------------------------------------------------------------------------------------

class _CountingModel:
    """v = x * y + t (+ offset), where y is a per-sample conditioning scalar; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):  # the Denoiser calling convention: model(x, t, cond)
        self.calls.append(x.shape[0])
        return x * cond["y"].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) + cond.get("offset", 0.0)


def test_cfg_velocity_formula_and_single_batch():
    g = _gen(50)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    cond = {"y": torch.tensor([2.0, 3.0, -1.0]), "offset": 0.5}
    uncond = {"y": torch.tensor([0.1, 0.2, 0.3]), "offset": 0.5}
    ref = _CountingModel()
    v_c, v_u = ref(x, t, cond), ref(x, t, uncond)
    for w in [0.0, 2.0, 4.5, -1.0]:
        m = _CountingModel()
        v = cfg_velocity(m, x, t, cond, uncond, w)
        torch.testing.assert_close(v, v_u + w * (v_c - v_u))
        assert m.calls == [6]  # one batched call of 2B
    # w = 0 gives the unconditional velocity: the conditional half comes first in the batch, or this fails
    torch.testing.assert_close(cfg_velocity(_CountingModel(), x, t, cond, uncond, 0.0), v_u)


def test_cfg_velocity_batch_order_conditional_first():
    seen = {}

    def model(x, t, cond):
        seen.update(x=x, t=t, **cond)
        return torch.zeros_like(x)

    x, t = torch.randn(2, 3), torch.tensor([0.2, 0.7])
    cond, uncond = {"y": torch.tensor([1, 2])}, {"y": torch.tensor([7, 8])}
    cfg_velocity(model, x, t, cond, uncond, 3.0)
    assert seen["y"].tolist() == [1, 2, 7, 8]
    torch.testing.assert_close(seen["x"], torch.cat([x, x]))
    torch.testing.assert_close(seen["t"], torch.cat([t, t]))


def test_cfg_velocity_no_guidance_single_call():
    g = _gen(51)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    cond, uncond = {"y": torch.tensor([2.0, 3.0, -1.0])}, {"y": torch.zeros(3)}
    m = _CountingModel()
    torch.testing.assert_close(cfg_velocity(m, x, t, cond, uncond, 1.0), m(x, t, cond))
    assert m.calls == [3, 3]  # cfg made exactly one call with batch B (the second is ours)
    m = _CountingModel()
    torch.testing.assert_close(cfg_velocity(m, x, t, cond, None, 5.0), m(x, t, cond))
    assert m.calls == [3, 3]


def test_cfg_inside_euler_sample():
    """Guided sampling with euler_sample equals the guided Euler loop written out by hand."""
    m = _CountingModel()
    cond, uncond = {"y": torch.full((2,), -0.5)}, {"y": torch.full((2,), -0.2)}
    noise = torch.randn(2, 1, 2, 2, generator=_gen(52))
    times = sampling_times(5, shift=3.0)
    out = euler_sample(lambda x, t: cfg_velocity(m, x, t, cond, uncond, 3.0), noise, times)
    assert m.calls == [4] * 5
    x = noise
    for i in range(5):
        tt = torch.full((2,), float(times[i]))
        v_c, v_u = m(x, tt, cond), m(x, tt, uncond)
        x = x + (times[i + 1] - times[i]) * (v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(out, x)


# --------------------------------------------------------------------------------------------------
# 9. Sampling times
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0, math.sqrt(2.0), 0.5])
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_sampling_times_shape_endpoints(n, shift):
    ts = sampling_times(n, shift)
    assert ts.shape == (n + 1,) and ts.dtype == torch.float32
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0  # exactly
    assert torch.all(ts[1:] < ts[:-1])
    torch.testing.assert_close(ts, shift_time(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift).float())
    if shift == 1.0:
        torch.testing.assert_close(ts, torch.linspace(1, 0, n + 1))


@pytest.mark.parametrize("bad", [0, -1])
def test_sampling_times_rejects_too_few_steps(bad):
    with pytest.raises(ValueError):
        sampling_times(bad)
