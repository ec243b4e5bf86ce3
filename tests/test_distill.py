"""Distillation: the DMD update on Gaussians (by hand), backward simulation, parameter separation of the
generator and critic updates, LoRA (merge exactness, save/load, switching), and K-DMD on a 2-D toy."""

import copy

import pytest
import torch

from helpers.builders import dummy_inputs, perturb_
from snapgen.distill.dmd import backward_simulate, dmd_gradient, dmd_loss, sample_tau
from snapgen.distill.kdmd import KDMDConfig, KDMDLoss
from snapgen.nn.lora import (add_lora, adapter_names, load_lora, lora_parameters, merge_lora, save_lora,
                                  set_adapter, use_adapter)
from snapgen.distill.toy import GaussianMixture2D, ToyVelocity, mode_report, train_toy_flow
from snapgen.sampling import euler_sample, few_step_sample, sampling_times
from snapgen.models import ThreeStageDiT, preset


def gaussian_x0(x_t, t, mean, s):
    """E[x0 | x_t] for data N(mean, s^2 I) under x_t = (1 - t) x0 + t eps."""
    t = t.view(-1, 1)
    var = (1 - t) ** 2 * s**2 + t**2
    return mean + (1 - t) * s**2 / var * (x_t - (1 - t) * mean)


def test_dmd_gradient_on_gaussians_matches_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    m_real, m_fake, s = torch.tensor([1.0, -2.0], dtype=f64), torch.tensor([0.2, 0.5], dtype=f64), 0.7
    x = m_fake + s * torch.randn(512, 2, generator=g, dtype=f64)
    tau = torch.rand(512, generator=g, dtype=f64) * 0.9 + 0.05
    x_tau = (1 - tau[:, None]) * x + tau[:, None] * torch.randn(512, 2, generator=g, dtype=f64)
    x0_real, x0_fake = gaussian_x0(x_tau, tau, m_real, s), gaussian_x0(x_tau, tau, m_fake, s)
    grad = dmd_gradient(x, x0_real, x0_fake)
    # equal variances: x0_fake - x0_real = (m_fake - m_real) t^2 / ((1-t)^2 s^2 + t^2), for every sample
    var = (1 - tau) ** 2 * s**2 + tau**2
    norm = (x - x0_real).abs().mean(1)
    expected = (m_fake - m_real)[None] * (tau**2 / var / norm)[:, None]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_one_dmd_step_moves_the_generated_mean_toward_the_teachers():
    g = torch.Generator().manual_seed(1)
    m_real, s = torch.tensor([1.0, -2.0]), 0.5
    mu = torch.tensor([-1.0, 1.0], requires_grad=True)  # generator G(z) = mu + s z
    opt = torch.optim.SGD([mu], lr=1.0)
    before = (mu - m_real).norm().item()
    z = torch.randn(256, 2, generator=g)
    x = mu + s * z
    tau = sample_tau(256, generator=g)
    with torch.no_grad():
        x_tau = (1 - tau[:, None]) * x + tau[:, None] * torch.randn(256, 2, generator=g)
        x0_real = gaussian_x0(x_tau, tau, m_real, s)
        x0_fake = gaussian_x0(x_tau, tau, mu.detach(), s)  # a perfect critic of the generator's distribution
    loss, grad = dmd_loss(x, x0_real, x0_fake)
    loss.backward()
    # d loss / d mu = sum_i grad_i / numel: exactly (mu - m_real) times a positive number
    direction = mu.grad / mu.grad.norm()
    torch.testing.assert_close(direction, (mu.detach() - m_real) / (mu.detach() - m_real).norm(), atol=1e-5, rtol=0)
    torch.testing.assert_close(mu.grad, (grad.sum(0) / x.numel()).float())
    opt.step()
    assert (mu - m_real).norm().item() < before


def test_backward_simulation_reaches_the_sampled_steps_noise_level():
    c = torch.tensor([2.0, -1.0])
    oracle = lambda x, t: (x - c) / t.view(-1, 1)  # predicts x0 = c exactly at every step  # noqa: E731
    times = sampling_times(4, 3.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, generator=g)
    assert torch.equal(backward_simulate(oracle, noise, times, 0), noise)
    for k in (1, 2, 3):
        x = backward_simulate(oracle, noise, times, k, generator=g)
        t = float(times[k])
        torch.testing.assert_close(x.mean(0), (1 - t) * c, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), t), atol=0.02, rtol=0)
        # re-noised with fresh noise: independent of the starting noise
        corr = ((x - x.mean(0)) * noise).mean(0) / x.std(0)
        assert corr.abs().max() < 0.03
    with pytest.raises(ValueError):
        backward_simulate(oracle, noise, times, 4)


def _toy_objective(fewstep=True, gen_every=2):
    torch.manual_seed(0)
    teacher = ToyVelocity(hidden=32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, critic = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for m in (student, critic):
        m.requires_grad_(True)
    perturb_(critic, seed=1)  # models that disagree, so that every loss term has a gradient
    proj = torch.nn.Linear(32, 32) if fewstep else None
    obj = KDMDLoss(KDMDConfig(gen_every=gen_every, guidance=1.0), student, critic, teacher,
                   perturb_(copy.deepcopy(teacher), seed=2) if fewstep else None, proj)
    return obj, student, critic, teacher, proj


def test_generator_and_critic_losses_touch_only_their_own_parameters():
    obj, student, critic, teacher, proj = _toy_objective()
    g = torch.Generator().manual_seed(0)
    gen_params = list(student.parameters()) + list(proj.parameters())
    # generator turn: the generator part has no path to the critic, the critic part none to the generator
    loss, metrics = obj(0, {}, None, (64, 2), g)
    assert {"loss_dmd", "loss_out", "loss_feat", "loss_critic"} <= set(metrics)
    parts = obj.last_parts
    assert all(gr is None for gr in torch.autograd.grad(parts["generator"], list(critic.parameters()),
                                                        retain_graph=True, allow_unused=True))
    assert all(gr is None for gr in torch.autograd.grad(parts["critic"], gen_params, retain_graph=True,
                                                        allow_unused=True))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen_params)
    assert all(p.grad is not None for p in critic.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # critic-only turn: the generator gets no gradient at all
    for p in gen_params + list(critic.parameters()):
        p.grad = None
    loss, metrics = obj(1, {}, None, (64, 2), g)
    loss.backward()
    assert "loss_dmd" not in metrics
    assert all(p.grad is None for p in gen_params)
    assert all(p.grad is not None for p in critic.parameters())


def test_generator_step_schedule_is_seeded():
    obj, *_ = _toy_objective()
    ks = [obj.step_index(s) for s in range(200)]
    assert set(ks) == {0, 1, 2, 3} and ks == [obj.step_index(s) for s in range(200)]
    assert [obj.is_generator_step(s) for s in range(4)] == [True, False, True, False]


# ----------------------------------------------------------------------------------------------------- LoRA
def test_lora_merge_is_exact_at_every_width_and_switches_off(tmp_path):
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(preset("nano-elastic")))
    x, t, text, mask = dummy_inputs(model.config)
    base = {v: model.set_variant(v)(x, t, {"text": text, "text_mask": mask}) for v in model.variants}
    model.set_variant("full")
    params = add_lora(model, "fast", rank=4, alpha=8)
    assert all(p.requires_grad for p in params) and len(params) == 2 * 10 * 4  # self/cross q,k,v,out + fc1, fc2 in 4 blocks
    with use_adapter(model, "fast"):
        assert torch.equal(model(x, t, {"text": text, "text_mask": mask}), base["full"])  # B = 0: a new adapter changes nothing
    with torch.no_grad():
        for p in lora_parameters(model, "fast").values():
            p.normal_(0, 0.05)
    merged = merge_lora(model, "fast")
    assert adapter_names(merged) == [] and adapter_names(model) == ["fast"]
    for v in model.variants:
        model.set_variant(v)
        merged.set_variant(v)
        with use_adapter(model, "fast"):
            on = model(x, t, {"text": text, "text_mask": mask})
        assert (on - base[v]).abs().max() > 1e-3
        torch.testing.assert_close(merged(x, t, {"text": text, "text_mask": mask}), on, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, t, {"text": text, "text_mask": mask}), base[v])  # switched off again
    # save / load into a fresh copy of the base weights
    model.set_variant("full")
    save_lora(model, "fast", tmp_path / "fast.safetensors")
    fresh = perturb_(ThreeStageDiT(preset("nano-elastic")))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    assert load_lora(fresh, tmp_path / "fast.safetensors") == "fast"
    set_adapter(fresh, "fast")
    set_adapter(model, "fast")
    assert torch.equal(fresh(x, t, {"text": text, "text_mask": mask}), model(x, t, {"text": text, "text_mask": mask}))


def test_lora_errors(tmp_path):
    model = ThreeStageDiT(preset("nano"))
    with pytest.raises(ValueError, match="unknown adapter"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="no Linear layer"):
        add_lora(model, "x", targets=("not_a_layer",))
    add_lora(model, "a", rank=2, alpha=2)
    save_lora(model, "a", tmp_path / "a.safetensors")
    other = ThreeStageDiT(preset("nano-elastic"))
    with pytest.raises(ValueError, match="does not fit|shape"):
        load_lora(other, tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_lora(other, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora(other, tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------ 2-D toy
def _distill(teacher, data, few_step_teacher=None, iters=1000, seed=3):
    student, critic = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for m in (student, critic):
        m.requires_grad_(True)
    proj = torch.nn.Linear(256, 256) if few_step_teacher is not None else None
    # critic_times uniform (the default, pinned here): the tolerances were set with it; at "tau" this seed gives
    # precision 0.577 (< 0.6), seeds 4, 5: 0.695, 0.685 vs 0.705, 0.683 uniform (issue 21 §1, docs/distillation.md)
    obj = KDMDLoss(KDMDConfig(guidance=1.0, gen_every=5, critic_times="uniform"), student, critic, teacher,
                   few_step_teacher, proj)
    gen = list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.Adam([{"params": gen}, {"params": list(critic.parameters())}], lr=5e-4, betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(seed)
    for step in range(iters):
        loss, _ = obj(step, {}, None, (256, 2), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student


def test_kdmd_turns_a_many_step_flow_model_into_a_4_step_generator_that_covers_every_mode():
    """Tolerances: the 4-step K-DMD generator puts >= 60% of its samples within 3 std of a mode (the teacher's
    own 4-step Euler sampling: ~35%; 50 steps: ~92%) and every one of the 8 modes gets >= half its share."""
    torch.manual_seed(0)
    data = GaussianMixture2D(std=0.15)
    teacher = train_toy_flow(ToyVelocity(hidden=256), data, steps=2000, batch=256, lr=3e-3)
    teacher.requires_grad_(False)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    times = sampling_times(4, 3.0)
    with torch.no_grad():
        many = mode_report(euler_sample(teacher, noise, sampling_times(50)), data, 3.0)
        four = mode_report(euler_sample(teacher, noise, times), data, 3.0)
    assert many["precision"] > 0.85 and four["precision"] < 0.5  # the task: 4 plain steps are not enough
    few_step_teacher = _distill(teacher, data)  # plain DMD: the few-step teacher (the paper's Lightning)
    student = _distill(teacher, data, few_step_teacher=few_step_teacher)
    with torch.no_grad():
        out = few_step_sample(student, noise, times, generator=torch.Generator().manual_seed(2))
    r = mode_report(out, data, 3.0)
    assert r["precision"] >= 0.6, r
    assert r["min_share_ratio"] >= 0.5, r


# ------------------------------------------------------------------------------------------------------ KD
def test_timestep_aware_scaling_weights():
    from snapgen.distill.kd import logit_normal_weight, timestep_aware_scaling

    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    a = logit_normal_weight(t)
    assert a[2] == pytest.approx(1.0, abs=1e-3) and a.max() <= 1.0
    torch.testing.assert_close(a[1], a[3])  # mean 0: symmetric around 1/2
    assert a[0] < 0.05 and a[4] < 0.05  # the ends belong to the teacher
    task = torch.tensor([2.0, 2.0], requires_grad=True)
    kd = torch.tensor([0.5, 0.5], requires_grad=True)
    out = timestep_aware_scaling(task, kd, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.detach(), torch.tensor([2.0, 2.0]))  # kd rescaled to the task's magnitude
    out.sum().backward()
    torch.testing.assert_close(task.grad, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(kd.grad, torch.tensor([0.0, 4.0]))  # |task| / |kd|, not differentiated


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_kd_weight_is_the_density_of_the_times_actually_drawn(shift):
    """alpha_t against a histogram of the sampler's own times (logit-normal, then shifted): the normalised density
    agrees bin by bin, and the unshifted density does not (it peaks at 0.5, the shifted times near 0.75)."""
    from snapgen.distill.kd import logit_normal_weight
    from snapgen.flow.objective import logit_normal_times

    g = torch.Generator().manual_seed(0)
    t = logit_normal_times(400_000, 0.0, 1.0, shift, g)
    hist = torch.histc(t, bins=50, min=0.0, max=1.0)
    centers = (torch.arange(50) + 0.5) / 50
    empirical = hist / hist.max()
    torch.testing.assert_close(logit_normal_weight(centers, 0.0, 1.0, shift), empirical, atol=0.04, rtol=0)
    if shift != 1.0:
        assert (logit_normal_weight(centers) - empirical).abs().max() > 0.3  # the old, unshifted weight
        assert float(centers[logit_normal_weight(centers, 0.0, 1.0, shift).argmax()]) > 0.65
    with pytest.raises(ValueError, match="shift must be positive"):
        logit_normal_weight(centers, shift=0.0)


def test_flow_task_with_a_teacher_distils_every_width(tmp_path):
    from helpers.runs import flow_config

    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig
    from snapgen.vae import Autoencoder, AutoencoderConfig
    import json

    torch.manual_seed(0)
    teacher = perturb_(ThreeStageDiT(preset("nano", text_dim=32)), std=0.05)
    kw = {"encoder_dims": [32], "out_dim": 32}
    TextToImagePipeline(teacher, TextConditioning(**kw), Autoencoder(AutoencoderConfig(channels=(8, 8), groups=4)),
                        PipelineConfig(conditioning=kw)).save_pretrained(tmp_path / "teacher")
    cfg = flow_config(tmp_path, "kd", 30, model={"preset": "nano-elastic"}, elastic={"num_random": 1},
                      kd={"teacher": str(tmp_path / "teacher")})
    trainer = Trainer(TrainConfig.from_dict(cfg), progress=False)
    assert trainer.task.kd.projectors["tiny"].in_features == 48 and trainer.task.kd.projectors["full"].out_features == 64
    trainer.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"kd_out_full", "kd_feat_tiny", "task_small"} <= set(recs[0])
    for w in ("full", "tiny"):
        first = sum(r[f"kd_out_{w}"] for r in recs[:5]) / 5
        last = sum(r[f"kd_out_{w}"] for r in recs[-5:]) / 5
        assert last < 0.7 * first, (w, first, last)  # the students move toward the teacher
    # the projectors are trained but not part of the exported transformer
    assert not any("proj" in k and "kd" in k for k in
                   ThreeStageDiT.from_pretrained(tmp_path / "kd" / "final" / "transformer").state_dict())


def test_feature_loss_kinds():
    from snapgen.distill.kdmd import KDMDConfig, feature_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    assert torch.allclose(feature_loss(s, t), ((s - t) ** 2).mean())
    cos = sum(float(s[b, i] @ t[b, i] / (s[b, i].norm() * t[b, i].norm())) for b in range(2) for i in range(5)) / 10
    assert float(feature_loss(s, t, "cosine")) == pytest.approx(1 - cos, rel=1e-5)
    # scale-free: the cosine loss ignores the teachers' feature magnitude, the mse grows with it
    assert float(feature_loss(s, 10 * t, "cosine")) == pytest.approx(float(feature_loss(s, t, "cosine")), rel=1e-5)
    assert float(feature_loss(s, 10 * t)) > 50 * float(feature_loss(s, t)) / 10
    assert float(feature_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feat_loss"):
        KDMDConfig(feat_loss="l1")
