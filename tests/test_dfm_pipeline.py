"""A DFM model in the pipeline and its exports: progressive sampling (packed pyramid noise, the dfm sampler, the
recomposed latent), the per-stage preview, pipeline.json round trip, ONNX parity and the errors that name the fix."""

import json

import pytest
import torch
from helpers.builders import ENC_DIM, SHIFT, TEXT_DIM, nano, perturb_
from helpers.fakes import FakeEncoder

from snapgen.flow.pyramid import Pyramid
from snapgen.models import ThreeStageDiT
from snapgen.pipelines import PipelineConfig, TextToImagePipeline
from snapgen.sampling import guided, make_sampler
from snapgen.text import TextConditioning
from snapgen.utils.random import randn
from snapgen.vae import Autoencoder, AutoencoderConfig

PROMPTS = ["a red circle", "two green hearts"]


def dfm_pipeline(text_encoder=None, spec="minilm"):
    torch.manual_seed(0)
    transformer = perturb_(ThreeStageDiT(nano(in_channels=4, vae_factor=2, text_dim=TEXT_DIM, dfm_levels=2)), 0.05)
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    kw = {"encoder_dims": [ENC_DIM], "out_dim": TEXT_DIM}
    config = PipelineConfig(text_encoder=spec, text_max_length=16, conditioning=kw, resolution=(16, 16), steps=5,
                            guidance=3.0, shift=SHIFT, sampler="dfm", stage_steps=(3, 2), stage_thresholds=(0.3,))
    return TextToImagePipeline(transformer, TextConditioning(**kw), vae, config, text_encoder=text_encoder)


@pytest.fixture(scope="module")
def pipe():
    return dfm_pipeline(FakeEncoder())


def test_progressive_sampling_is_the_sampler_on_the_packed_noise(pipe):
    got = pipe(PROMPTS, seed=3, return_latents=True)
    assert got.shape == (2, 4, 8, 8)
    # the same computation by hand: packed noise first from the seed, the dfm sampler with CFG, then recompose
    p = Pyramid(2)
    (text, mask), (null, null_mask) = pipe.encode_prompts(PROMPTS)
    L = max(text.shape[1], null.shape[1])
    text = torch.nn.functional.pad(text, (0, 0, 0, L - text.shape[1]))
    mask = torch.nn.functional.pad(mask, (0, L - mask.shape[1]), value=False)
    null = torch.nn.functional.pad(null, (0, 0, 0, L - null.shape[1]))
    null_mask = torch.nn.functional.pad(null_mask, (0, L - null_mask.shape[1]), value=False)
    noise = randn((2, 20, 4, 4), torch.Generator().manual_seed(3))
    sampler = make_sampler(pipe.sampler_config())
    out = sampler.sample(guided(pipe.transformer, {"text": text, "text_mask": mask},
                                {"text": null, "text_mask": null_mask}, 3.0), noise, split=p.channel_split(4))
    torch.testing.assert_close(got, p.recompose(p.unpack(out)), atol=1e-6, rtol=0)
    assert got.abs().mean() > 0.1
    # a seed list: each image its own noise, whatever the batch
    alone = pipe(PROMPTS[1:], seed=[7], return_latents=True)
    both = pipe(PROMPTS, seed=[5, 7], return_latents=True)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_preview_arrives_once_per_stage_before_the_image(pipe):
    seen = []
    images = pipe(PROMPTS, seed=0, preview=lambda k, ims, s: seen.append((k, ims, s)))
    assert [k for k, _, _ in seen] == [0] and len(seen[0][1]) == 2 and seen[0][2] > 0
    assert seen[0][1][0].size == images[0].size == (16, 16)
    # the preview is the coarse level's prediction at the switch: the same images with any later stage_steps
    later = []
    pipe(PROMPTS, seed=0, stage_steps=[3, 4], preview=lambda k, ims, s: later.append(ims))
    assert [list(a.getdata()) for a in later[0]] == [list(a.getdata()) for a in seen[0][1]]
    assert pipe(PROMPTS, seed=0, stage_steps=[3, 4], return_latents=True).shape == (2, 4, 8, 8)


def test_dfm_pipeline_folder_round_trip(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert meta["sampler"] == "dfm" and meta["stage_steps"] == [3, 2] and meta["stage_thresholds"] == [0.3]
    back = TextToImagePipeline.from_pretrained(tmp_path / "p", text_encoder=FakeEncoder())
    assert back.transformer.config.dfm_levels == 2 and back.sampler_config() == pipe.sampler_config()
    torch.testing.assert_close(back(PROMPTS, seed=1, return_latents=True), pipe(PROMPTS, seed=1, return_latents=True),
                               atol=2e-3, rtol=0)  # the folder's fp16 weights


def test_dfm_pipeline_errors_name_the_fix(pipe):
    with pytest.raises(ValueError, match=r"pass stage_steps \(e.g. --stage-steps 3 2; now 5 in all\)"):
        pipe(PROMPTS, steps=8)
    euler = dfm_pipeline(FakeEncoder())
    euler.config = euler.config.replace(sampler="euler")
    with pytest.raises(ValueError, match="samples with the dfm sampler, not 'euler'"):
        euler(PROMPTS)
    euler.config = euler.config.replace(sampler="dfm", stage_steps=(2, 2, 2), stage_thresholds=(0.5, 0.2))
    with pytest.raises(ValueError, match="3 stage\\(s\\) \\(stage_steps\\) but the model has 2 pyramid levels"):
        euler(PROMPTS)
    with pytest.raises(ValueError, match="3 stages need 2 stage_thresholds, got 1"):
        pipe(PROMPTS, stage_steps=[2, 2, 2])


@pytest.mark.export
def test_dfm_pipeline_exports_to_onnx_and_samples_the_same(tmp_path, elastic_folder):
    pytest.importorskip("onnxruntime")
    from snapgen.export.onnx import OnnxPipeline, export_onnx
    from snapgen.pipelines import TextToImagePipeline as P

    elastic = P.from_pretrained(elastic_folder)  # its text encoder: a real tiny BERT (exportable)
    pipe = dfm_pipeline(elastic.text_encoder, spec=elastic.config.text_encoder)
    out = export_onnx(pipe, tmp_path / "onnx", progress=False)
    meta = json.loads((out / "export.json").read_text())
    assert meta["dfm_levels"] == 2 and meta["sampler"] == "dfm" and len(meta["stage_schedule"]) == 6
    runtime = OnnxPipeline(out)
    a = runtime(PROMPTS, seed=2, return_latents=True)
    b = pipe(PROMPTS, seed=2, return_latents=True)
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_generate_cli_writes_the_preview_first(tmp_path, elastic_folder, capsys):
    from snapgen.cli import main

    spec = TextToImagePipeline.from_pretrained(elastic_folder).config.text_encoder  # a tiny BERT folder
    dfm_pipeline(spec=spec).save_pretrained(tmp_path / "p")
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "p"), "--preview", "--stage-steps", "2", "2",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "x_preview1.png").is_file() and out.is_file()
    assert text.index("preview after stage 1") < text.index(str(out)) and "x_preview2" not in text
    assert main(["generate", "a red circle", "--model", str(tmp_path / "p"), "--steps", "9", "--out",
                 str(tmp_path / "y.png")]) == 2
    assert "pass stage_steps" in capsys.readouterr().err
