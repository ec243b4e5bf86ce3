"""Tests of ``snapgen.sampling``: one SamplerConfig -> one sampler, used by the pipeline, exports and K-DMD.

Convention (docs/conventions.md): times run from 1 (noise) to exactly 0; Euler ``x <- x + (t_next - t) v``;
few-step ``x0 = x - t v`` then re-noise ``x = (1 - t_next) x0 + t_next eps``; CFG ``v_u + w (v_c - v_u)``.
"""

from __future__ import annotations

import json

import pytest
import torch

from snapgen.sampling import (
    SAMPLERS,
    EulerSampler,
    FewStepSampler,
    Sampler,
    SamplerConfig,
    cfg_velocity,
    guided,
    make_sampler,
    sampling_times,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _velocity(seed: int):
    """A fixed nonlinear velocity field of x and t."""
    w = torch.randn(4, 4, generator=_gen(seed)) * 0.5
    return lambda x, t: torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + t.view(-1, 1, 1, 1))


# ------------------------------------------------------------------------------------------ SamplerConfig
def test_sampler_config_round_trip():
    for c in (SamplerConfig(), SamplerConfig("euler", steps=7, shift=3.0, guidance=4.5),
              SamplerConfig("few_step", steps=4, shift=3.0, times=(1.0, 0.9, 0.75, 0.5, 0.0)),
              SamplerConfig("few_step", times=[1, 0.5, 0])):
        d = json.loads(json.dumps(c.to_dict()))
        assert SamplerConfig.from_dict(d) == c
        assert make_sampler(d).config == c
    c = SamplerConfig("few_step", times=[1, 0.5, 0])
    assert c.steps == 2 and c.times == (1.0, 0.5, 0.0) and isinstance(c.times, tuple)
    assert SamplerConfig().steps == 20 and SamplerConfig().guidance == 1.0
    assert SamplerConfig.from_dict({"kind": "euler", "steps": 3}) == SamplerConfig("euler", 3)


@pytest.mark.parametrize("kw, words", [
    ({"kind": "heun"}, r"unknown sampler 'heun'; known: dfm, euler, few_step"),
    ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
    ({"steps": 2.5}, r"steps must be an integer >= 1"),
    ({"shift": 0.0}, r"shift must be positive"),
    ({"shift": float("nan")}, r"shift must be a finite number"),
    ({"guidance": -1.0}, r"guidance must be >= 0"),
    ({"guidance": "4"}, r"guidance must be a finite number"),
    ({"kind": "few_step", "times": (1.0, 0.5, 0.1)}, r"from 1 \(noise\) to exactly 0"),
    ({"kind": "few_step", "times": (0.9, 0.5, 0.0)}, r"from 1 \(noise\) to exactly 0"),
    ({"kind": "few_step", "times": (1.0, 0.5, 0.6, 0.0)}, r"strictly decreasing"),
    ({"kind": "few_step", "times": (1.0,)}, r"at least 2 entries"),
    ({"kind": "few_step", "times": ("a", 0.0)}, r"list of numbers"),
])
def test_sampler_config_validation_errors(kw, words):
    with pytest.raises(ValueError, match=words):
        SamplerConfig(**kw)


def test_sampler_config_from_dict_errors():
    with pytest.raises(ValueError, match=r"unknown sampler config keys \['step'\]"):
        SamplerConfig.from_dict({"kind": "euler", "step": 3})
    with pytest.raises(ValueError, match="needs 'kind'"):
        SamplerConfig.from_dict({"steps": 3})
    with pytest.raises(ValueError, match="must be a dict"):
        SamplerConfig.from_dict("euler")


def test_legacy_fields_and_overrides():
    """pipeline.json's flat fields: few_step_times are read by the few-step sampler only, and are its grid at
    their own step count; any other step count samples on sampling_times(steps, shift)."""
    times = (1.0, 0.9, 0.75, 0.5, 0.0)
    few = SamplerConfig.from_fields("few_step", 4, 1.0, 3.0, times)
    assert few == SamplerConfig("few_step", 4, 3.0, times, 1.0) and few.uses_times()
    assert few.to_fields() == {"sampler": "few_step", "steps": 4, "guidance": 1.0, "shift": 3.0,
                               "few_step_times": times}
    assert SamplerConfig.from_fields(**few.to_fields()) == few
    assert SamplerConfig.from_fields("euler", 4, 4.0, 3.0, times).times == ()  # never read by Euler
    # call-time overrides: the stored grid at its own count (shift does not apply), derived at any other
    grid = lambda c: make_sampler(c).times()  # noqa: E731
    assert torch.equal(grid(few.override(steps=4, shift=2.0)), torch.tensor(times))
    assert torch.equal(grid(few.override(steps=2)), sampling_times(2, 3.0))
    assert torch.equal(grid(few.override(steps=2, shift=2.0)), sampling_times(2, 2.0))
    assert few.override(steps=2, shift=2.0, guidance=3.0) == SamplerConfig("few_step", 2, 2.0, times, 3.0)
    odd = SamplerConfig.from_fields("few_step", 7, 1.0, 3.0, (1.0, 0.5, 0.0))  # times for 2 steps, default 7
    assert not odd.uses_times() and torch.equal(grid(odd), sampling_times(7, 3.0))
    assert torch.equal(grid(odd.override(steps=2)), torch.tensor([1.0, 0.5, 0.0]))
    assert SamplerConfig("euler", 4).override(shift=2.0).shift == 2.0
    assert few.settings() == {"sampler": "few_step", "steps": 4, "guidance": 1.0, "shift": 3.0}
    with pytest.raises(ValueError, match="explicit times cannot be written"):
        SamplerConfig("euler", times=(1.0, 0.0)).to_fields()


def test_registry_lists_every_sampler():
    from snapgen.sampling import DFMSampler

    assert SAMPLERS.names() == ["dfm", "euler", "few_step"]
    assert SAMPLERS.get("euler") is EulerSampler and SAMPLERS.get("few_step") is FewStepSampler
    assert SAMPLERS.get("dfm") is DFMSampler
    for kind in SAMPLERS.names():
        s = make_sampler(SamplerConfig(kind, steps=3, **({"stage_steps": (3,)} if kind == "dfm" else {})))
        assert isinstance(s, Sampler) and s.config.kind == kind


# ------------------------------------------------------------------------------------------ the samplers
@pytest.mark.parametrize("kind", ["euler", "few_step"])
@pytest.mark.parametrize("steps, shift", [(1, 1.0), (4, 3.0), (9, 0.5)])
def test_endpoint_times(kind, steps, shift):
    ts = make_sampler(SamplerConfig(kind, steps, shift)).times()
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0  # exactly
    assert (ts[1:] < ts[:-1]).all()
    assert torch.equal(ts, sampling_times(steps, shift))
    given = (1.0, 0.8999999761581421, 0.75, 0.5, 0.0)
    ts = make_sampler(SamplerConfig(kind, times=given)).times()
    assert ts.tolist() == list(given) and ts[-1].item() == 0.0


def test_euler_sampler_is_the_hand_written_loop():
    f = _velocity(1)
    noise = torch.randn(2, 4, 3, 3, generator=_gen(2))
    sampler = make_sampler(SamplerConfig("euler", steps=5, shift=3.0))
    ts = [3.0 * t / (1 + 2.0 * t) for t in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)]
    x = noise
    for t, tn in zip(ts, ts[1:]):
        x = x + (tn - t) * f(x, torch.full((2,), t))
    torch.testing.assert_close(sampler.sample(f, noise), x)
    assert torch.equal(sampler.sample(f, noise, generator=_gen(0), progress=False), sampler.sample(f, noise))


def test_few_step_sampler_is_the_hand_written_loop():
    f = _velocity(3)
    noise = torch.randn(2, 4, 3, 3, generator=_gen(4))
    times = (1.0, 0.9, 0.75, 0.5, 0.0)
    g = _gen(9)
    x = noise
    for t, tn in zip(times, times[1:]):
        x0 = x - t * f(x, torch.full((2,), t))
        x = (1 - tn) * x0 + tn * torch.randn(x.shape, generator=g) if tn > 0 else x0
    out = make_sampler(SamplerConfig("few_step", times=times)).sample(f, noise, generator=_gen(9))
    torch.testing.assert_close(out, x)
    # derived grid: the same as the functional sampler on sampling_times
    from snapgen.flow import few_step_sample

    derived = make_sampler(SamplerConfig("few_step", steps=3, shift=2.0)).sample(f, noise, generator=_gen(5))
    assert torch.equal(derived, few_step_sample(f, noise, sampling_times(3, 2.0), generator=_gen(5)))


def test_few_step_sampler_with_a_generator_per_row_runs_every_row_on_its_own():
    """A list of generators (one per image): row i's re-noising noise comes from generator i alone, so a row's
    result is the one-row run with that generator, whatever the other rows; one generator draws the batch."""
    f = _velocity(3)
    times = (1.0, 0.9, 0.5, 0.0)
    sampler = make_sampler(SamplerConfig("few_step", times=times))
    noise = torch.randn(3, 4, 3, 3, generator=_gen(4))
    out = sampler.sample(f, noise, generator=[_gen(5), _gen(6), _gen(7)])
    for i, s in enumerate((5, 6, 7)):
        torch.testing.assert_close(out[i:i + 1], sampler.sample(f, noise[i:i + 1], generator=_gen(s)))
    swapped = sampler.sample(f, noise[[2, 0]], generator=[_gen(7), _gen(5)])
    torch.testing.assert_close(swapped[1], out[0])
    # one generator: the batch's noise drawn together (row 1 is not the one-row run with that generator)
    batch = sampler.sample(f, noise[[2, 0]], generator=_gen(5))
    assert (batch[1] - out[0]).abs().max() > 1e-2
    # Euler draws nothing: a list changes nothing
    euler = make_sampler(SamplerConfig("euler", steps=3))
    assert torch.equal(euler.sample(f, noise, generator=[_gen(0)] * 3), euler.sample(f, noise))


@pytest.mark.parametrize("kind", ["euler", "few_step"])
def test_point_mass_oracle_reaches_c(kind):
    """Data = one point c: the exact velocity v = (x - c) / t predicts x0 = c; both samplers land on c."""
    c = torch.tensor([[1.5, -2.0, 0.25]])
    v = lambda x, t: (x - c) / t[:, None]  # noqa: E731
    noise = torch.randn(10, 3, generator=_gen(30))
    for config in (SamplerConfig(kind, 1), SamplerConfig(kind, 4, 3.0), SamplerConfig(kind, 7, 0.5),
                   SamplerConfig(kind, times=(1.0, 0.9, 0.75, 0.5, 0.0))):
        out = make_sampler(config).sample(v, noise, generator=_gen(0))
        torch.testing.assert_close(out, c.expand(10, 3), atol=1e-5, rtol=1e-5)


def test_guided_is_cfg_velocity():
    class Model:
        def __call__(self, x, t, cond):
            return x * cond["y"].view(-1, 1) + t.view(-1, 1)

    x, t = torch.randn(3, 2, generator=_gen(6)), torch.rand(3, generator=_gen(7))
    cond, uncond = {"y": torch.tensor([1.0, 2.0, 3.0])}, {"y": torch.zeros(3)}
    m = Model()
    v_c, v_u = m(x, t, cond), m(x, t, uncond)
    torch.testing.assert_close(guided(m, cond, uncond, 4.0)(x, t), v_u + 4.0 * (v_c - v_u))
    assert torch.equal(guided(m, cond, uncond, 4.0)(x, t), cfg_velocity(m, x, t, cond, uncond, 4.0))
    assert torch.equal(guided(m, cond, uncond, 1.0)(x, t), v_c)


def test_flow_shim_reexports_the_same_functions():
    import snapgen.flow as flow
    import snapgen.flow.sampling as old
    import snapgen.sampling as new

    for name in ("cfg_velocity", "euler_sample", "few_step_sample", "sampling_times"):
        assert getattr(flow, name) is getattr(new, name) is getattr(old, name)


def test_kdmd_grid_is_the_few_step_sampler_grid():
    from snapgen.distill.dmd import backward_simulate
    from snapgen.distill.kdmd import KDMDConfig, KDMDLoss

    cfg = KDMDConfig(steps=4, shift=3.0)
    loss = KDMDLoss(cfg, None, None, None)
    assert torch.equal(loss.times, sampling_times(4, 3.0))
    assert torch.equal(loss.times, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert cfg.sampler_config() == SamplerConfig("few_step", 4, 3.0, guidance=1.0)
    f = lambda x, t: x * 0.5 + t.view(-1, 1)  # noqa: E731
    noise = torch.randn(5, 2, generator=_gen(8))
    assert torch.equal(backward_simulate(f, noise, cfg.sampler_config(), 2, _gen(1)),
                       backward_simulate(f, noise, loss.times, 2, _gen(1)))


# ------------------------------------------------------------------------------------------ the pipeline
SHIPPED_TIMES = (1.0, 0.8999999761581421, 0.75, 0.5, 0.0)


def test_shipped_pipeline_json_reads_as_sampler_configs():
    """models/snapgen-micro/pipeline.json (the pre-SamplerConfig fields) -> the two samplers it describes."""
    from snapgen.pipelines import PipelineConfig, default_model_dir

    config = PipelineConfig.from_json(default_model_dir() / "pipeline.json")
    assert config.sampler_config() == SamplerConfig("few_step", 4, 3.0, SHIPPED_TIMES, 1.0)
    assert config.base_sampler_config() == SamplerConfig("euler", 20, 1.0, (), 4.0)
    # written back through the SamplerConfigs: the same file content
    assert config.with_sampler(config.sampler_config()).with_base_sampler(config.base_sampler_config()) == config
    assert PipelineConfig().base_sampler_config() == SamplerConfig("euler", 28, 1.0, (), 4.0)  # defaults
    with pytest.raises(ValueError, match="explicit times"):
        config.with_base_sampler(SamplerConfig("few_step", times=(1.0, 0.5, 0.0)))
    assert config.with_base_sampler(None).base_sampling == {}


class _Words:
    """A fake text encoder: one fixed random vector per word."""

    dim, max_length, name = 16, 8, "fake"

    def encode(self, captions):
        import zlib

        words = [c.split()[: self.max_length] for c in captions]
        L = max(len(w) for w in words)
        tokens, mask = torch.zeros(len(captions), L, self.dim), torch.zeros(len(captions), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                tokens[i, j] = torch.randn(self.dim, generator=_gen(zlib.crc32(w.encode())))
                mask[i, j] = True
        return tokens, mask


def _tiny_pipeline(**config):
    from helpers.builders import nano, perturb_

    from snapgen.models import ThreeStageDiT
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.vae import Autoencoder, AutoencoderConfig

    torch.manual_seed(0)
    dit = perturb_(ThreeStageDiT(nano(in_channels=4, vae_factor=2, text_dim=32)), std=0.05)
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    cond_kw = {"encoder_dims": [16], "out_dim": 32}
    conditioning = TextConditioning(**cond_kw)
    with torch.no_grad():
        conditioning.null_embeddings[0].normal_(0, 1.0, generator=_gen(1))
    cfg = PipelineConfig(text_max_length=16, conditioning=cond_kw, resolution=(16, 16), **config)
    return TextToImagePipeline(dit, conditioning, vae, cfg, text_encoder=_Words())


def _old_latents(pipe, prompts, seed=0, steps=None, guidance=None, shift=None):
    """The pipeline's sampling before snapgen.sampling (cb5a1d9), written out with the functional samplers."""
    from snapgen.flow import cfg_velocity, euler_sample, few_step_sample
    from snapgen.pipelines.text_to_image import _pad_tokens

    c = pipe.config
    if pipe._base_mode:
        b = c.base_sampling
        s = {"sampler": b.get("sampler", "euler"), "steps": int(b.get("steps", 28)),
             "guidance": float(b.get("guidance", 4.0)), "shift": float(b.get("shift", 1.0))}
    else:
        s = {"sampler": c.sampler, "steps": c.steps, "guidance": c.guidance, "shift": c.shift}
    steps = s["steps"] if steps is None else steps
    guidance = s["guidance"] if guidance is None else guidance
    with torch.no_grad():
        (text, mask), (null, null_mask) = pipe.encode_prompts(prompts)
        L = max(text.shape[1], null.shape[1])
        (text, mask), (null, null_mask) = _pad_tokens(text, mask, L), _pad_tokens(null, null_mask, L)
        gen = _gen(seed)
        noise = torch.randn((len(prompts), 4, 8, 8), generator=gen)
        v = lambda x, t: cfg_velocity(pipe.transformer, x, t, {"text": text, "text_mask": mask},  # noqa: E731
                                      {"text": null, "text_mask": null_mask}, guidance)
        if s["sampler"] == "few_step" and c.few_step_times and steps == len(c.few_step_times) - 1:
            return few_step_sample(v, noise, torch.tensor(c.few_step_times), generator=gen)
        if s["sampler"] == "few_step":
            return few_step_sample(v, noise, sampling_times(steps, s["shift"] if shift is None else shift),
                                   generator=gen)
        return euler_sample(v, noise, sampling_times(steps, s["shift"] if shift is None else shift))


OLD_FORMAT = {"sampler": "few_step", "steps": 4, "guidance": 1.0, "shift": 3.0,
              "few_step_times": list(SHIPPED_TIMES),
              "base_sampling": {"sampler": "euler", "steps": 3, "guidance": 3.0, "shift": 2.0}}


def test_old_format_pipeline_json_samples_as_before(tmp_path):
    """A folder whose pipeline.json has the pre-SamplerConfig fields loads and samples exactly as before, for
    the default sampler, other step counts / shifts / guidance, and the base sampler."""
    from snapgen.pipelines import TextToImagePipeline

    folder = _tiny_pipeline().save_pretrained(tmp_path / "pipe")
    d = json.loads((folder / "pipeline.json").read_text())
    assert {"sampler", "steps", "guidance", "shift", "few_step_times", "base_sampling"} <= set(d)
    d.update(OLD_FORMAT)
    d.pop("adapters")  # not distilled: use_base() is refused, so the base sampler is checked below by hand
    (folder / "pipeline.json").write_text(json.dumps(d))
    pipe = TextToImagePipeline.from_pretrained(folder, text_encoder=_Words())
    prompts = ["a red circle", "two blue squares on the left"]
    for kw in ({}, {"seed": 3}, {"steps": 2}, {"steps": 3, "shift": 2.0}, {"shift": 2.0}, {"guidance": 2.5},
               {"steps": 4, "guidance": 2.0}):
        new = pipe(prompts, return_latents=True, **kw)
        assert torch.equal(new, _old_latents(pipe, prompts, **kw)), kw
    images = pipe(prompts, seed=1)
    ref = pipe.vae.decode_latents(_old_latents(pipe, prompts, seed=1))
    from snapgen.data.base import tensor_to_image

    assert all(a.tobytes() == tensor_to_image(b).tobytes() for a, b in zip(images, ref))
    # the base sampler (as use_base() would pick it) on the same folder
    pipe._base_mode = True
    assert pipe.sampling_settings() == {"sampler": "euler", "steps": 3, "guidance": 3.0, "shift": 2.0}
    for kw in ({}, {"steps": 2, "shift": 1.0}):
        assert torch.equal(pipe(prompts, return_latents=True, **kw), _old_latents(pipe, prompts, **kw)), kw


def test_euler_pipeline_and_mismatched_few_step_times_sample_as_before():
    prompts = ["a red circle"]
    for config in ({"steps": 3, "guidance": 3.0, "shift": 2.0},  # test_pipeline's Euler + CFG pipeline
                   {"sampler": "few_step", "steps": 3, "guidance": 1.0, "shift": 2.0,
                    "few_step_times": (1.0, 0.5, 0.0)},  # a grid for 2 steps: used when 2 steps are asked for
                   {"sampler": "euler", "steps": 2, "few_step_times": (1.0, 0.5, 0.0)}):  # ignored by Euler
        pipe = _tiny_pipeline(**config)
        for kw in ({}, {"steps": 2}, {"steps": 2, "shift": 3.0}):
            new = pipe(prompts, return_latents=True, **kw)
            assert torch.equal(new, _old_latents(pipe, prompts, **kw)), (config, kw)


def test_exported_runtime_reads_its_sampler_from_export_json(tmp_path):
    """export.json keeps pipeline.json's sampler fields (old exports have no sampling_times); the runtime
    builds the same SamplerConfig from them and refuses a manifest whose DiT batch contradicts its CFG."""
    from snapgen.export.common import ExportedPipeline, sampler_meta

    few = SamplerConfig("few_step", 4, 3.0, SHIPPED_TIMES, 1.0)
    meta = sampler_meta(make_sampler(few))
    assert meta == {"sampler": "few_step", "steps": 4, "guidance": 1.0, "shift": 3.0,
                    "few_step_times": list(SHIPPED_TIMES), "sampling_times": list(SHIPPED_TIMES)}
    runtime = object.__new__(ExportedPipeline)
    runtime.directory, runtime.command = tmp_path, "onnx"
    old = {k: v for k, v in meta.items() if k != "sampling_times"}
    runtime.meta = {**old, "batch": 1}
    assert runtime.sampler_config() == few
    runtime.meta = {"sampler": "euler", "steps": 20, "guidance": 4.0, "shift": 1.0, "batch": 2,
                    "few_step_times": list(SHIPPED_TIMES)}  # a base-mode export of a distilled pipeline
    assert runtime.sampler_config() == SamplerConfig("euler", 20, 1.0, (), 4.0)
    runtime.meta["batch"] = 1
    with pytest.raises(ValueError, match="inconsistent: a DiT graph of batch 1 with guidance 4.0"):
        runtime.sampler_config()
