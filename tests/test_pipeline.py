"""The text-to-image pipeline on a tiny random model: images, determinism, the sampler it runs (checked
against a hand-written Euler/CFG loop), save/load (fp32 and fp16), input and file errors, ``snapgen
generate`` and ``make_grid``."""

import itertools
import json

import numpy as np
import pytest
import torch
from helpers.builders import ENC_DIM, SHIFT, build_pipeline, save_tiny_bert
from helpers.fakes import FakeEncoder
from PIL import Image

from snapgen.cli import main
from snapgen.pipelines import PipelineConfig, TextToImagePipeline
from snapgen.utils.images import make_grid


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(text_encoder=FakeEncoder())


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


# ------------------------------------------------------------------------------------- hand-written sampler
def manual_latents(pipe, prompts, steps, guidance, seed, H, W):
    """Euler from t=1 to 0 on SD3-shifted times, v = v_u + w (v_c - v_u) with the two branches run
    separately (the pipeline batches them and pads the null condition to the prompt length)."""
    B = len(prompts)
    cond, dit = pipe.conditioning, pipe.transformer
    with torch.no_grad():
        tokens, mask = FakeEncoder().encode(prompts)
        text = cond.proj[0](tokens).masked_fill(~mask[..., None], 0.0)
        null = cond.proj[0](cond.null_embeddings[0])[None].expand(B, -1, -1)
        null_mask = torch.ones(B, null.shape[1], dtype=torch.bool)
        x = torch.randn((B, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(seed))
        ts = [i / steps for i in range(steps, -1, -1)]
        ts = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in ts]
        for t, t_next in itertools.pairwise(ts):
            tt = torch.full((B,), t)
            v = dit(x, tt, text, mask)
            if guidance != 1.0:
                v_u = dit(x, tt, null, null_mask)
                v = v_u + guidance * (v - v_u)
            x = x + (t_next - t) * v
    return x


def test_guidance_one_is_the_conditional_euler_loop(pipe):
    prompts = ["a red circle", "two blue squares on the left"]
    lat = pipe(prompts, steps=4, guidance=1.0, seed=3, height=16, width=24, return_latents=True)
    ref = manual_latents(pipe, prompts, 4, 1.0, 3, 16, 24)
    assert lat.shape == (2, 4, 8, 12)
    assert torch.allclose(lat, ref, atol=1e-5, rtol=0), (lat - ref).abs().max()
    # the model really moved the latents away from the noise
    noise = torch.randn((2, 4, 8, 12), generator=torch.Generator().manual_seed(3))
    assert (lat - noise).abs().max() > 0.05


def test_cfg_is_v_u_plus_w_times_difference(pipe):
    prompts = ["a red circle", "a green triangle above a square"]
    lat = pipe(prompts, steps=3, guidance=4.0, seed=1, height=24, width=16, return_latents=True)
    ref = manual_latents(pipe, prompts, 3, 4.0, 1, 24, 16)
    assert torch.allclose(lat, ref, atol=1e-5, rtol=0), (lat - ref).abs().max()
    # guidance matters (the text and the null condition give different velocities)
    plain = manual_latents(pipe, prompts, 3, 1.0, 1, 24, 16)
    assert (lat - plain).abs().max() > 1e-2
    # the default guidance/steps/shift come from the config
    assert torch.allclose(pipe(prompts, seed=1, height=24, width=16, return_latents=True),
                          manual_latents(pipe, prompts, 3, 3.0, 1, 24, 16), atol=1e-5, rtol=0)


def test_images_are_decoded_latents(pipe):
    from snapgen.data.base import tensor_to_image

    lat = pipe(["a cat"], seed=5, height=16, width=24, return_latents=True)
    ims = pipe(["a cat"], seed=5, height=16, width=24)
    with torch.no_grad():
        ref = tensor_to_image(pipe.vae.decode(lat / 0.7 + 0.1)[0])
    assert np.array_equal(np.asarray(ims[0]), np.asarray(ref))


# -------------------------------------------------------------------------------------------- outputs
def test_output_images_sizes_and_determinism(pipe):
    ims = pipe(["a red circle", "a blue square"], seed=0, height=16, width=32)
    assert isinstance(ims, list) and len(ims) == 2
    for im in ims:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (32, 16)   # PIL: (W, H)
    assert pipe("a red circle", seed=0)[0].size == (16, 16)       # a single str; default resolution
    tall = pipe("a red circle", seed=0, height=24, width=8)[0]
    assert tall.size == (8, 24)
    a = pixels(ims)
    assert a.std() > 5                                           # not a flat image
    assert np.array_equal(a, pixels(pipe(["a red circle", "a blue square"], seed=0, height=16, width=32)))
    other = pixels(pipe(["a red circle", "a blue square"], seed=1, height=16, width=32))
    assert np.abs(a - other).mean() > 1
    # the first prompt of an int-seeded batch gets the first rows of the batch's draw, i.e. its one-prompt noise
    # (the padding the others add does not change it); the others' noise depends on the batch -- a seed list
    # gives every image its own (test_a_seed_list_gives_every_image_its_own_noise_whatever_the_batch)
    alone = pixels(pipe(["a red circle"], seed=0, height=16, width=32))
    assert np.abs(alone[0] - a[0]).max() <= 1
    assert hasattr(pipe, "last_seconds")


def test_different_prompts_give_different_images(pipe):
    a = pixels(pipe(["a red circle"], seed=0))
    b = pixels(pipe(["a blue square far away"], seed=0))
    assert np.abs(a - b).mean() > 2
    # seed=None still works (fresh noise)
    assert pipe("a red circle", seed=None)[0].size == (16, 16)


# ------------------------------------------------------------------------------------------ per-image seeds
A, B, C = "a red circle", "two blue squares on the left of a big green triangle", "a cat"
FEW_STEP_TIMES = (1.0, 0.75, 0.4, 0.0)


@pytest.fixture(scope="module")
def few_step_pipe():
    """The tiny pipeline with a distilled generator's sampler: few-step (predict x0, re-noise with fresh noise
    from the generator), no CFG."""
    p = build_pipeline(text_encoder=FakeEncoder())
    p.config = p.config.replace(sampler="few_step", few_step_times=FEW_STEP_TIMES, steps=3, guidance=1.0)
    return p


@pytest.mark.parametrize("kind", ["euler", "few_step"])
def test_a_seed_list_gives_every_image_its_own_noise_whatever_the_batch(kind, pipe, few_step_pipe):
    """seed=[5, 6, 7]: image i's initial noise and the few-step sampler's re-noising noise come from its own
    generator, so A's image is the same alone, first of [A, B, C] or second of [C, A] (up to the rounding of
    batched matmuls: latents to 1e-5, pixels to one 8-bit level, which a multi-threaded matmul can flip), and it
    is the int-seeded one-prompt image."""
    p = pipe if kind == "euler" else few_step_pipe
    assert p.sampling_settings()["sampler"] == kind
    abc = p([A, B, C], seed=[5, 6, 7], return_latents=True)
    alone = p([A], seed=[5], return_latents=True)
    ca = p([C, A], seed=[7, 5], return_latents=True)
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(abc[0], alone[0], **close)
    torch.testing.assert_close(ca[1], alone[0], **close)
    torch.testing.assert_close(ca[0], abc[2], **close)
    assert torch.equal(alone, p([A], seed=5, return_latents=True))  # one prompt: [s] is the int seed s
    assert (abc[1] - p([B], seed=5, return_latents=True)[0]).abs().max() > 0.1  # B has its own seed, 6
    ims = pixels(p([A, B, C], seed=[5, 6, 7]))
    one = pixels(p([A], seed=5))[0]
    assert np.abs(ims[0] - one).max() <= 1 and np.abs(pixels(p([C, A], seed=[7, 5]))[1] - one).max() <= 1
    assert np.abs(ims[1] - pixels(p([B], seed=6))[0]).max() <= 1
    # an int seed draws the batch together: A second in [C, A] is not its one-prompt image
    assert (p([C, A], seed=5, return_latents=True)[1] - alone[0]).abs().max() > 0.1


def manual_few_step_latents(pipe, prompts, times, seed, H, W):
    """The few-step loop by hand with the int seed's one generator: the batch's initial noise, then each step's
    re-noising noise for the whole batch, in that order (what every release has drawn)."""
    B = len(prompts)
    cond, dit = pipe.conditioning, pipe.transformer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tokens, mask = FakeEncoder().encode(prompts)
        text = cond.proj[0](tokens).masked_fill(~mask[..., None], 0.0)
        x = torch.randn((B, 4, H // 2, W // 2), generator=g)
        for t, t_next in itertools.pairwise(times):
            x0 = x - t * dit(x, torch.full((B,), t), {"text": text, "text_mask": mask})
            x = (1 - t_next) * x0 + t_next * torch.randn(x.shape, generator=g) if t_next > 0 else x0
    return x


def test_an_int_seed_still_draws_the_batch_from_one_generator(few_step_pipe):
    """The int path is unchanged (existing results stay reproducible): one generator, the batch's noise drawn
    together -- initial noise then each re-noising draw for the whole batch (the Euler case is
    test_guidance_one_is_the_conditional_euler_loop / test_cfg_is_v_u_plus_w_times_difference)."""
    prompts = [A, B]
    lat = few_step_pipe(prompts, seed=3, height=16, width=24, return_latents=True)
    ref = manual_few_step_latents(few_step_pipe, prompts, FEW_STEP_TIMES, 3, 16, 24)
    torch.testing.assert_close(lat, ref, atol=1e-5, rtol=0)
    assert (lat[1] - few_step_pipe([B], seed=3, height=16, width=24, return_latents=True)[0]).abs().max() > 0.1


def test_a_seed_list_of_the_wrong_length_or_type_is_refused(pipe):
    with pytest.raises(ValueError, match=r"list of 1 seed\(s\) but 2 prompt\(s\) were given"):
        pipe([A, B], seed=[1])
    with pytest.raises(ValueError, match=r"list of 3 seed\(s\) but 1 prompt\(s\)"):
        pipe(A, seed=[1, 2, 3])
    with pytest.raises(TypeError, match="a seed list holds integers"):
        pipe([A, B], seed=[1, "2"])


# ------------------------------------------------------------------------------------------- save/load
def test_save_load_float32_identical(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "pipeline.json",
                                                          "text_conditioning.safetensors", "transformer", "vae"]
    # one card, at the top: the transformer/ and vae/ subfolders get none
    assert not (tmp_path / "transformer" / "README.md").exists() and not (tmp_path / "vae" / "README.md").exists()
    back = TextToImagePipeline.from_pretrained(tmp_path, text_encoder=FakeEncoder())
    assert back.config == pipe.config
    assert PipelineConfig.from_json(tmp_path / "pipeline.json") == pipe.config
    assert json.loads((tmp_path / "pipeline.json").read_text())["_class_name"] == "TextToImagePipeline"
    prompts = ["a red circle", "a blue square"]
    assert np.array_equal(pixels(back(prompts, seed=2, height=16, width=24)),
                          pixels(pipe(prompts, seed=2, height=16, width=24)))


def test_save_load_float16_close(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, dtype=torch.float16)
    back = TextToImagePipeline.from_pretrained(tmp_path, text_encoder=FakeEncoder())
    for (k, p), q in zip(pipe.transformer.state_dict().items(), back.transformer.state_dict().values()):
        assert q.dtype == torch.float32 and torch.equal(q, p.half().float()), k
    for (k, p), q in zip(pipe.conditioning.state_dict().items(), back.conditioning.state_dict().values()):
        assert q.dtype == torch.float32 and torch.equal(q, p.half().float()), k
    prompts = ["a red circle", "a blue square"]
    a = pixels(pipe(prompts, seed=2, height=16, width=24))
    b = pixels(back(prompts, seed=2, height=16, width=24))
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 6      # typically 0.02 and 1
    assert np.abs(a - pixels(pipe(prompts, seed=3, height=16, width=24))).mean() > 5  # "close" means something


def test_pipeline_config_json_round_trip(tmp_path):
    cfg = PipelineConfig(text_encoder="/some/folder", text_max_length=24,
                         conditioning={"encoder_dims": [16, 8], "out_dim": 32, "null_length": 2},
                         resolution=(48, 64), steps=7, guidance=2.5, shift=3.0, sampler="few_step",
                         few_step_times=(1.0, 0.5, 0.0))
    cfg.to_json(tmp_path / "p.json")
    back = PipelineConfig.from_json(tmp_path / "p.json")
    assert back == cfg and back.resolution == (48, 64) and back.few_step_times == (1.0, 0.5, 0.0)
    # older files without the optional sampler keys still load, with the defaults
    d = json.loads((tmp_path / "p.json").read_text())
    del d["sampler"], d["few_step_times"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = PipelineConfig.from_json(tmp_path / "old.json")
    assert old.sampler == "euler" and old.few_step_times == ()
    d["colour"] = "red"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="colour"):
        PipelineConfig.from_json(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("prompts,exc,words", [
    ("", ValueError, "empty prompt"),
    ("   ", ValueError, "empty prompt"),
    (["a cat", ""], ValueError, "empty prompt"),
    ([], ValueError, "no prompt"),
    ([3], TypeError, "must be strings.*int"),
    (["a cat", None], TypeError, "must be strings.*NoneType"),
    (123, TypeError, "prompt"),
    (None, TypeError, "prompt"),
    ("x" * 1001, ValueError, "1001 characters"),
])
def test_bad_prompts(pipe, prompts, exc, words):
    with pytest.raises(exc, match=words):
        pipe(prompts)


@pytest.mark.parametrize("kw,words", [
    ({"height": 20}, r"height=20 must be a multiple of 8 .*factor 2 x transformer downsampling 4.*16 or 24"),
    ({"width": 36}, r"width=36 must be a multiple of 8.*32 or 40"),
    ({"width": 4}, r"width=4 must be a multiple of 8.*8 or 8"),
    ({"height": 4096}, r"height=4096 is too large \(max 2048\)"),
    ({"width": 2056}, r"too large"),
    ({"height": 0}, r"positive integer"),
    ({"height": 16.0}, r"positive integer"),
    ({"steps": 0}, r"steps must be an integer in \[1, 1000\], got 0"),
    ({"steps": 2.5}, r"steps"),
    ({"guidance": -1.0}, r"guidance must be in \[0, 50\]"),
])
def test_bad_sizes_and_settings(pipe, kw, words):
    with pytest.raises(ValueError, match=words):
        pipe("a cat", **kw)


# ------------------------------------------------------------------------------------------ file errors
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    build_pipeline().save_pretrained(folder)
    return folder


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_missing_folder_and_pipeline_json(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        TextToImagePipeline.from_pretrained(tmp_path / "missing", text_encoder=FakeEncoder())
    with pytest.raises(FileNotFoundError, match="pipeline.json is missing"):
        TextToImagePipeline.from_pretrained(tmp_path, text_encoder=FakeEncoder())
    d = copy_of(saved, tmp_path)
    (d / "text_conditioning.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text_conditioning.safetensors"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())


def test_corrupt_pipeline_json(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    (d / "pipeline.json").write_text('{"text_encoder": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())


def test_corrupt_text_conditioning(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    f = d / "text_conditioning.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())
    f.write_bytes(data[:5])
    with pytest.raises(ValueError, match="corrupt"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())


def test_text_conditioning_not_matching_pipeline_json(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    cfg = json.loads((d / "pipeline.json").read_text())
    cfg["conditioning"]["null_length"] = 3
    (d / "pipeline.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match pipeline.json"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())


def test_corrupt_transformer_and_vae_weights(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    w = d / "transformer" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())
    w.write_bytes(data)
    v = d / "vae" / "model.safetensors"
    v.write_bytes(v.read_bytes()[:64])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TextToImagePipeline.from_pretrained(d, text_encoder=FakeEncoder())


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny pipeline whose pipeline.json names a tiny random BERT (hidden 16) saved with MiniLM's tokenizer."""
    bert_dir = save_tiny_bert(tmp_path_factory.mktemp("bert"), ENC_DIM)
    folder = tmp_path_factory.mktemp("cli_pipe")
    build_pipeline(text_encoder_spec=str(bert_dir)).save_pretrained(folder)
    return folder


def one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("snapgen generate: error:") and "\n" not in err, err
    assert "Traceback" not in cap.err
    for w in words:
        assert w in err, (w, err)
    return err


def test_cli_generate_errors(capsys, tmp_path, cli_model):
    one_line_error(capsys, ["generate", ""], "empty prompt")
    one_line_error(capsys, ["generate", "a cat", "  "], "empty prompt")
    one_line_error(capsys, ["generate"], "no prompt given")
    one_line_error(capsys, ["generate", "a cat", "--model", str(tmp_path / "missing")], "model folder not found",
                   "missing")
    one_line_error(capsys, ["generate", "a cat", "--prompts-file", str(tmp_path / "nope.txt")],
                   "prompts file not found", "nope.txt")
    one_line_error(capsys, ["generate", "a cat", "--model", str(tmp_path)], "pipeline.json is missing")
    one_line_error(capsys, ["generate", "a cat", "--model", str(cli_model), "--size", "65", "64", "--no-progress"],
                   "height=65", "64 or 72")
    one_line_error(capsys, ["generate", "a cat", "--model", str(cli_model), "--steps", "0", "--no-progress"],
                   "steps")
    one_line_error(capsys, ["generate", "a", "b", "--model", str(cli_model), "--out", str(tmp_path / "x.png"),
                            "--no-progress"], "2 prompts need --out to be a folder")
    assert not (tmp_path / "x.png").exists()


def test_cli_generate_writes_images(capsys, tmp_path, cli_model):
    out = tmp_path / "imgs"
    assert main(["generate", "a", "b", "--model", str(cli_model), "--out", str(out), "--no-progress",
                 "--size", "16", "24", "--seed", "4"]) == 0
    stdout = capsys.readouterr().out
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00_a.png", "01_b.png"]
    assert all(str(f) in stdout for f in files) and "generated 2 image(s) of 16x24" in stdout
    # the files are exactly what the library makes from the same folder (its own text encoder, seed 4)
    pipe = TextToImagePipeline.from_pretrained(cli_model)
    ref = pixels(pipe(["a", "b"], seed=4, height=16, width=24))
    got = pixels([Image.open(f) for f in files])
    assert got.shape == (2, 16, 24, 3) and np.array_equal(got, ref)

    # --grid with a file --out (prompts from a file, comments and blank lines skipped): exactly one PNG
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\n# a comment\n\n  a blue square  \n")
    grid_dir = tmp_path / "grid"
    assert main(["generate", "--prompts-file", str(pf), "--model", str(cli_model), "--out",
                 str(grid_dir / "g.png"), "--grid", "--no-progress"]) == 0
    assert str(grid_dir / "g.png") in capsys.readouterr().out
    assert [f.name for f in grid_dir.iterdir()] == ["g.png"]
    grid = Image.open(grid_dir / "g.png")
    assert grid.size == (2 * 96, 2 * 16 + 40)   # 2 cells of max(16*2, 96) wide; 16px images x2 + 40px caption strips (3 lines)

    # --grid with a folder --out: one PNG per prompt plus grid.png
    both = tmp_path / "both"
    assert main(["generate", "--prompts-file", str(pf), "--model", str(cli_model), "--out", str(both),
                 "--grid", "--no-progress"]) == 0
    capsys.readouterr()
    assert sorted(f.name for f in both.iterdir()) == ["00_a_red_circle.png", "01_a_blue_square.png", "grid.png"]
    assert Image.open(both / "grid.png").size == grid.size


# ----------------------------------------------------------------------------------------------- grid
def test_make_grid_layout():
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)) for _ in range(5)]
    g = make_grid(ims, ["a red circle", "b", "c", "d", "e"])
    assert g.mode == "RGB" and g.size == (4 * 96, 2 * (16 + 28))         # 4 columns, 2 rows, caption strips
    x0 = (96 - 24) // 2
    assert np.array_equal(np.asarray(g.crop((x0, 0, x0 + 24, 16))), np.asarray(ims[0]))
    assert np.array_equal(np.asarray(g.crop((x0, 44, x0 + 24, 60))), np.asarray(ims[4]))   # row 2, column 1
    assert np.array_equal(np.asarray(g.crop((3 * 96 + x0, 0, 3 * 96 + x0 + 24, 16))), np.asarray(ims[3]))
    assert (np.asarray(g.crop((96, 44, 4 * 96, 88))) == 255).all()          # the unused cells stay white
    caption = np.asarray(g.crop((0, 16, 96, 44)))
    assert caption.min() < 128                                          # some text was written there
    plain = make_grid(ims[:3], cols=1, scale=2)
    assert plain.size == (96, 3 * 32)                                   # no caption strip, 2x upscale
    big = make_grid(ims[:2], ["x", "y"], scale=5)                       # cells wider than 96
    assert big.size == (2 * 120, 80 + 28)
    assert np.array_equal(np.asarray(big.crop((120, 0, 240, 80))),
                          np.asarray(ims[1].resize((120, 80), Image.Resampling.NEAREST)))
