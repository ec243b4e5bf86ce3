"""Decomposable Flow Matching's functional core (DFM, arXiv 2506.19839): the Laplacian pyramid, Algorithm 1's
objective and the stage-scheduled sampler, each against a slow obvious reference or an exact identity."""

import math

import pytest
import torch
import torch.nn.functional as F

from snapgen.flow import FlowMatchingLoss
from snapgen.flow.dfm import CODE_EARLIER_LOGIT_MEAN, DecomposableFlowLoss
from snapgen.flow.pyramid import Pyramid
from snapgen.sampling import SamplerConfig, euler_sample, guided, make_sampler, sampling_times, stage_schedule
from snapgen.sampling.dfm import NOT_STARTED, dfm_sample


# --- the pyramid --------------------------------------------------------------------------------------------
def _slow_down(x):  # the mean of every 2x2 block, by hand
    B, C, H, W = x.shape
    out = torch.zeros(B, C, H // 2, W // 2, dtype=x.dtype)
    for i in range(H // 2):
        for j in range(W // 2):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3))
    return out


@pytest.mark.parametrize("levels", [2, 3])
def test_pyramid_round_trip_and_operators(levels):
    p = Pyramid(levels)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    parts = p.decompose(x)
    assert [tuple(q.shape[2:]) for q in parts] == p.shapes((16, 8))
    assert parts[0].shape[2:] == (16 // 2 ** (levels - 1), 8 // 2 ** (levels - 1))
    torch.testing.assert_close(p.recompose(parts), x, atol=1e-12, rtol=0)  # lossless (float64 rounding)
    # down = the official code's bilinear halving (no antialias) = the 2x2 block mean; up = bilinear x2
    torch.testing.assert_close(p.down(x), _slow_down(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(p.down(x), F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False,
                                                        antialias=False), atol=1e-12, rtol=0)
    # the coarsest level is x averaged down levels - 1 times; each residual averages to 0 one level down
    ref = x
    for _ in range(levels - 1):
        ref = _slow_down(ref)
    torch.testing.assert_close(parts[0], ref, atol=1e-12, rtol=0)
    assert p.down(parts[-1]).abs().max() > 1e-3  # bilinear up is not the block-mean's inverse: residual != 0 mean
    # pack / unpack: one latent-shaped tensor on the coarsest grid, levels stacked along channels
    packed = p.pack(parts)
    assert packed.shape == (2, *p.packed_shape(3, (16, 8))) == (2, 3 * sum(4 ** s for s in range(levels)),
                                                                    *parts[0].shape[2:])
    for a, b in zip(p.unpack(packed), parts):
        assert torch.equal(a, b)
    fine = packed[:, -3 * 4 ** (levels - 1):]  # the finest level's channels = its pixel_unshuffle
    assert torch.equal(fine, F.pixel_unshuffle(parts[-1], 2 ** (levels - 1)))
    torch.testing.assert_close(p.preview(parts), x, atol=1e-12, rtol=0)
    assert p.preview(parts[:1]).shape == x.shape


def test_pyramid_3d_round_trip():
    p = Pyramid(2, dims=3)
    x = torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)
    parts = p.decompose(x)
    assert parts[0].shape == (1, 2, 2, 4, 4)
    torch.testing.assert_close(p.recompose(parts), x, atol=1e-12, rtol=0)
    packed = p.pack(parts)
    assert packed.shape == (1, 2 * 9, 2, 4, 4) and all(torch.equal(a, b) for a, b in zip(p.unpack(packed), parts))
    # space-to-depth keeps each 2x2x2 block of the fine level together: channel group (c, dt, dy, dx)
    assert packed[0, 2 + 0 * 8 + 5, 1, 2, 3] == parts[1][0, 0, 2 * 1 + 1, 2 * 2 + 0, 2 * 3 + 1]
    torch.testing.assert_close(parts[0][0, 0, 0, 0, 0], x[0, 0, :2, :2, :2].mean(), atol=1e-12, rtol=0)


def test_pyramid_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"multiple of 4 latent pixels.*nearest valid sides: 10 -> 8 or 12$"):
        Pyramid(3).decompose(torch.zeros(1, 1, 10, 8))
    with pytest.raises(ValueError, match="multiple of 2"):
        Pyramid(2).shapes((7, 8))
    with pytest.raises(ValueError, match="levels >= 1"):
        Pyramid(0)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        Pyramid(2, dims=3).decompose(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="a multiple of 5 channels, got 4"):
        Pyramid(2).unpack(torch.zeros(1, 4, 8, 8))
    one = Pyramid(1)
    x = torch.randn(1, 2, 5, 3)  # one level: any size, the identity
    assert torch.equal(one.recompose(one.decompose(x)), x)


# --- Algorithm 1 ---------------------------------------------------------------------------------------------
class PerLevel(torch.nn.Module):
    """A toy multi-scale denoiser: level s's velocity = a_s * x_s + b_s * t_s (its own parameters only)."""

    def __init__(self, pyramid, size):
        super().__init__()
        self.pyramid, self.size = pyramid, size
        self.a = torch.nn.Parameter(torch.linspace(0.5, 1.5, pyramid.levels))
        self.b = torch.nn.Parameter(torch.linspace(-1.0, 1.0, pyramid.levels))

    def forward(self, x, t, cond):
        levels = self.pyramid.unpack(x)
        tt = t.clamp(max=1.0)
        out = [self.a[s] * lv + self.b[s] * tt[:, s, None, None, None] for s, lv in enumerate(levels)]
        return self.pyramid.pack(out)


def test_one_level_dfm_is_plain_flow_matching_draw_for_draw():
    x0 = torch.randn(6, 4, 8, 8)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def plain(x, t, cond):
        return conv(x) * (1 + t[:, None, None, None])

    def packed(x, t, cond):  # the same function on the one-level packed state (the latent itself), t (B, 1)
        assert t.shape == (6, 1) and x.shape == x0.shape
        return plain(x, t[:, 0], cond)

    for shift in (1.0, 3.0):
        a = FlowMatchingLoss(shift=shift)(plain, x0, generator=torch.Generator().manual_seed(5))
        b = DecomposableFlowLoss(levels=1, shift=shift)(packed, x0, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_stage_draws_and_time_ranges_match_the_configuration():
    # 4,000 stage draws: P(Q = 0) = 0.9 within 4.5 binomial standard errors; the stage's logit(t) ~ N(0.3, 0.8),
    # earlier levels' ~ N(-2.0, 1) (the code's location), later levels NOT_STARTED
    loss = DecomposableFlowLoss(levels=3, stage_probs=[0.9, 0.06, 0.04], mean=0.3, std=0.8,
                                earlier_logit_mean=CODE_EARLIER_LOGIT_MEAN)
    g = torch.Generator().manual_seed(0)
    n = 4000
    qs = torch.tensor([loss.draw_stage(g) for _ in range(n)])
    for q, p in enumerate([0.9, 0.06, 0.04]):
        freq = float((qs == q).float().mean())
        assert abs(freq - p) < 4.5 * math.sqrt(p * (1 - p) / n), (q, freq)
    times = loss.draw_times(20000, 2, 1.0, g)
    logit = torch.logit(times[:, :2].double())
    for s, (m, sd) in enumerate([(-2.0, 1.0), (-2.0, 1.0)]):
        assert abs(float(logit[:, s].mean()) - m) < 4.5 * sd / math.sqrt(20000)
        assert abs(float(logit[:, s].std()) - sd) < 0.03
    stage = torch.logit(loss.draw_times(20000, 1, 1.0, g)[:, 1].double())
    assert abs(float(stage.mean()) - 0.3) < 4.5 * 0.8 / math.sqrt(20000) and abs(float(stage.std()) - 0.8) < 0.03
    t = loss.draw_times(50, 0, 1.0, g)
    assert bool((t[:, 1:] == NOT_STARTED).all()) and bool(((t[:, 0] > 0) & (t[:, 0] < 1)).all())


def test_draw_gives_one_stage_per_batch_and_shifts_only_its_level():
    from snapgen.flow.dfm import PAPER_EARLIER_LOGIT_MEAN

    loss = DecomposableFlowLoss(levels=2, shift=3.0)  # the paper's defaults: [0.9, 0.1], location -1.5 here
    assert loss.stage_probs == [0.9, 0.1] and loss.earlier_logit_mean == PAPER_EARLIER_LOGIT_MEAN == -1.5
    g = torch.Generator().manual_seed(2)
    n, fine = 3000, []
    for _ in range(n):
        t, eps = loss.draw((4, 2, 8, 8), g)
        assert eps.shape == (4, 10, 4, 4)
        started = (t <= 1).sum(1)
        assert bool((started == started[0]).all())  # one Q for the whole batch
        fine.append(int(started[0]) == 2)
    p = sum(fine) / n
    assert abs(p - 0.1) < 4.5 * math.sqrt(0.09 / n)
    # at Q = 1 the stage's level is shifted (shift 3), the earlier level is not: logit means -1.5 and
    # logit(shift(sigmoid(N(0, 1)))) = N(0, 1) + log 3
    t = loss.draw_times(20000, 1, 3.0, g).double()
    assert abs(float(torch.logit(t[:, 0]).mean()) + 1.5) < 0.035
    assert abs(float(torch.logit(t[:, 1]).mean()) - math.log(3.0)) < 0.035
    with pytest.raises(ValueError, match="3 non-negative probabilities summing to 1"):
        DecomposableFlowLoss(levels=3, stage_probs=[0.9, 0.1])


def test_masked_levels_get_no_gradient_and_do_not_change_the_loss():
    p = Pyramid(2)
    model = PerLevel(p, (8, 8))
    x0 = torch.randn(4, 2, 8, 8)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4)  # block mean 0: only the fine level moves
    x1 = x0 + 3.0 * checker
    assert torch.allclose(p.decompose(x0)[0], p.decompose(x1)[0], atol=1e-6)
    loss = DecomposableFlowLoss(levels=2)
    kw = {"stage": 0, "times": None}
    a = loss.terms(model, x0, torch.Generator().manual_seed(1), **kw)
    b = loss.terms(model, x1, torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)  # the fine level is masked at Q = 0
    assert bool((a.per_level[:, 1] == 0).all()) and bool((a.per_level[:, 0] > 0).all())
    a.loss.backward()
    assert model.a.grad[1] == 0 and model.b.grad[1] == 0 and model.a.grad[0] != 0
    model.zero_grad()
    c = loss.terms(model, x0, torch.Generator().manual_seed(1), stage=1)
    c.loss.backward()
    assert model.a.grad[1] != 0 and model.a.grad[0] != 0
    torch.testing.assert_close(c.per_sample, c.per_level.sum(1))  # summed over started levels
    d = loss.terms(model, x1, torch.Generator().manual_seed(1), stage=1)
    assert (d.loss - c.loss).abs() > 1e-3  # at Q = 1 the fine level counts


def test_not_started_levels_reach_the_model_as_zero_input():
    p = Pyramid(2)
    seen = {}

    def model(x, t, cond):
        seen["levels"], seen["t"] = p.unpack(x), t
        return torch.zeros_like(x)

    DecomposableFlowLoss(levels=2).terms(model, torch.randn(3, 2, 8, 8), torch.Generator().manual_seed(0), stage=0)
    assert bool((seen["levels"][1] == 0).all()) and seen["levels"][0].abs().max() > 0
    assert bool((seen["t"][:, 1] == NOT_STARTED).all())


# --- the stage schedule and sampler ------------------------------------------------------------------------
def test_two_stage_schedule_is_the_official_worked_example():
    # snap-research/elit samplers_dfm.py, [4, 2] steps, tau 0.1: (t0, t1) per step, stage 1 not started at first
    want = [(1, NOT_STARTED), (.775, NOT_STARTED), (.55, NOT_STARTED), (.325, NOT_STARTED), (.1, 1.0), (.05, .5),
            (0, 0)]
    torch.testing.assert_close(stage_schedule([4, 2], [0.1]), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("steps,taus", [([3, 2], [0.3]), ([4, 3, 2], [0.5, 0.1]), ([2, 2, 3, 2], [0.8, 0.4, 0.1])])
def test_schedule_is_monotone_per_stage_and_ends_at_zero(steps, taus):
    sched = stage_schedule(steps, taus)
    assert sched.shape == (sum(steps) + 1, len(steps))
    assert bool((sched[-1] == 0).all())
    for s in range(len(steps)):
        col = sched[:, s]
        started = col <= 1
        first = int(started.nonzero()[0])
        assert bool(started[first:].all()) and col[first] == 1.0
        assert first == sum(steps[:s])  # stage s starts after the earlier chunks
        assert bool((col[first + 1:] < col[first:-1]).all())  # strictly decreasing once started
        if s < len(steps) - 1:  # at the start of the next stage this one stands at its threshold
            assert col[sum(steps[:s + 1])] == pytest.approx(taus[s])


def _oracle(p, size, target):
    """The exact velocity towards one data point ``target``, per level: v_s = (x_s - X*_s) / t_s; not-started
    levels get NaN, so any use of them would poison the result."""
    levels = p.decompose(target)

    def velocity(x, t):
        out = []
        for s, (lv, X) in enumerate(zip(p.unpack(x), levels)):
            ts = t[:, s, None, None, None]
            out.append(torch.where(ts <= 1, (lv - X) / ts.clamp(min=1e-6), torch.full_like(lv, float("nan"))))
        return p.pack(out)
    return velocity


@pytest.mark.parametrize("levels,steps,taus", [(2, [3, 2], [0.3]), (3, [2, 2, 2], [0.5, 0.2])])
def test_sampler_with_the_exact_velocity_lands_on_the_data_and_previews_its_coarse_level(levels, steps, taus):
    p = Pyramid(levels)
    size = (8, 8)
    target = torch.randn(2, 3, *size, dtype=torch.float64)
    noise = torch.randn(2, *p.packed_shape(3, size), dtype=torch.float64)
    previews, inputs = [], []
    oracle = _oracle(p, size, target)

    def velocity(x, t):
        inputs.append((x.clone(), t.clone()))
        return oracle(x, t)

    sampler = make_sampler(SamplerConfig(kind="dfm", stage_steps=tuple(steps), stage_thresholds=tuple(taus)))
    out = sampler.sample(velocity, noise, split=p.channel_split(3), on_stage=lambda k, x0: previews.append((k, x0)))
    torch.testing.assert_close(p.recompose(p.unpack(out)), target, atol=1e-9, rtol=0)
    assert len(inputs) == sum(steps)
    for s in range(levels):  # a level is 0 until its stage starts, then starts from its own noise
        start = sum(steps[:s])
        for i, (x, t) in enumerate(inputs):
            level = p.unpack(x)[s]
            if i < start:
                assert bool((level == 0).all()) and bool((t[:, s] == NOT_STARTED).all())
            elif i == start:
                assert torch.equal(level, p.unpack(noise)[s]) and bool((t[:, s] == 1).all())
    assert [k for k, _ in previews] == list(range(levels - 1))
    for k, x0 in previews:
        got = p.unpack(x0)
        for s in range(levels):
            if s <= k:
                torch.testing.assert_close(got[s], p.decompose(target)[s], atol=1e-9, rtol=0)
            else:
                assert bool((got[s] == 0).all())


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_one_stage_sampler_is_euler_and_cfg_matches_the_plain_sampler(shift):
    x = torch.randn(2, 4, 6, 6)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def model(xt, t, cond):  # a denoiser on (B, C, H, W), t (B,)
        return conv(xt) * (1 + t[:, None, None, None]) + cond["c"][:, None, None, None]

    def packed(xt, t, cond):  # one level: the packed state is the latent, t is (B, 1)
        return model(xt, t[:, 0], cond)

    cond, uncond = {"c": torch.tensor([0.5, -1.0])}, {"c": torch.zeros(2)}
    with torch.no_grad():
        want = euler_sample(guided(model, cond, uncond, 3.0), x, sampling_times(5, shift))
    cfg = SamplerConfig(kind="dfm", stage_steps=(5,), shift=shift)
    assert cfg.steps == 5 and cfg.to_fields()["stage_steps"] == (5,)
    got = make_sampler(cfg).sample(guided(packed, cond, uncond, 3.0), x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (want - x).abs().max() > 0.1


def test_shift_spaces_each_chunk_and_keeps_the_thresholds():
    flat, shifted = stage_schedule([4, 3], [0.3]), stage_schedule([4, 3], [0.3], shift=3.0)
    assert shifted[4, 0] == flat[4, 0] == pytest.approx(0.3) and shifted[4, 1] == 1.0  # tau is where stage 2 starts
    assert bool((shifted[1:4, 0] > flat[1:4, 0]).all())  # more of chunk 1's steps at high noise
    assert bool((shifted[1:, 0] < shifted[:-1, 0]).all()) and shifted[-1].abs().max() == 0
    times = make_sampler(SamplerConfig(kind="dfm", stage_steps=(4, 3), stage_thresholds=(0.3,), shift=3.0)).times()
    assert times.dtype == torch.float32 and bool((times[1:] < times[:-1]).all()) and times[0] == 1 and times[-1] == 0


def test_dfm_sampler_config_errors_and_fields():
    cfg = SamplerConfig.from_fields("dfm", 30, 2.0, 1.0, stage_steps=[20, 10], stage_thresholds=[0.3])
    assert cfg.steps == 30 and cfg.stage_steps == (20, 10) and cfg.stage_thresholds == (0.3,)
    assert SamplerConfig.from_fields(**cfg.to_fields()) == cfg
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg
    assert "stage_steps" not in SamplerConfig(kind="euler", steps=4).to_dict()
    for kw, match in [({"stage_steps": (20, 10)}, "need 1 stage_thresholds"),
                      ({"stage_steps": (20, 10, 5), "stage_thresholds": (0.1, 0.3)}, "strictly decreasing"),
                      ({"stage_steps": (20, 0), "stage_thresholds": (0.3,)}, "integer >= 1"),
                      ({"stage_steps": (), "stage_thresholds": ()}, "one integer >= 1 per pyramid stage"),
                      ({"stage_steps": (20, 10), "stage_thresholds": (0.3,), "steps": 12}, "sum\\(stage_steps\\) = 30")]:
        with pytest.raises(ValueError, match=match):
            SamplerConfig(kind="dfm", **kw)
    with pytest.raises(ValueError, match="settings of the 'dfm' sampler"):
        SamplerConfig(kind="euler", stage_steps=(4,))
    with pytest.raises(ValueError, match="does not match a packed state of 10 channels"):
        dfm_sample(lambda x, t: x, torch.zeros(1, 10, 2, 2), stage_schedule([2, 2], [0.5]), split=[2, 7])
