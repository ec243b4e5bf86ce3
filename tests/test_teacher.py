"""External diffusers teachers (snapgen.distill.diffusers_teacher): the conversion to snapgen's convention
against the diffusers models and pipelines themselves (SD3, Flux-dev, Qwen-Image), feature taps through
forward hooks on the student's token grid, the teacher's own text side (negative prompt for dropped captions,
padding) and the config checks (snapgen.tasks.teachers)."""

import json

import pytest
import torch
from helpers.teachers import diffusers_pipeline, save_tiny_flux, save_tiny_qwenimage, save_tiny_sd3

from snapgen.distill.diffusers_families import pack_latents, unpack_latents
from snapgen.distill.diffusers_teacher import DiffusersTeacher
from snapgen.distill.teacher import match_token_grid

CAPTIONS = ["a red circle", "a pink square to the left of a yellow circle and two green hearts"]
OPTIONS = {"sd3": {"max_sequence_length": 8}, "flux": {"max_sequence_length": 8, "guidance": 3.5},
           "qwenimage": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return {"sd3": save_tiny_sd3(d / "sd3"), "flux": save_tiny_flux(d / "flux"),
            "qwenimage": save_tiny_qwenimage(d / "qwenimage")}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8])


def test_sd3_velocity_is_the_diffusers_call_at_1000_t(folders):
    """SD3 takes ``timestep = 1000 sigma`` and predicts ``eps - x0`` on (B, C, H, W) latents: the teacher's
    velocity at snapgen time t is exactly that call, with the pipeline's own text embeddings."""
    teacher = DiffusersTeacher.from_pretrained(folders["sd3"], max_sequence_length=8)
    pipe = diffusers_pipeline(folders["sd3"])
    cond = teacher.condition(CAPTIONS)
    emb, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=8)
    torch.testing.assert_close(cond["encoder_hidden_states"], emb, atol=0, rtol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=0, rtol=0)
    x, t = _inputs()
    with torch.no_grad():
        want = pipe.transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                                timestep=1000 * t, return_dict=False)[0]
        unscaled = pipe.transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                                    timestep=t, return_dict=False)[0]
        got = teacher(x, t, cond)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (unscaled - want).abs().max() > 1e-2  # the time scale matters, so a wrong one fails above
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_euler_sampling_with_the_teacher_reproduces_the_diffusers_pipeline(folders, family):
    """The teacher's guided velocity integrated with Euler on the pipeline's own sigma grid gives the pipeline's
    latents: timestep scale, packing (Flux / Qwen-Image), the text encoders' features, the negative prompt and
    the guidance (SD3 CFG; Flux-dev embedded guidance; Qwen-Image true CFG with its norm rescale) all match."""
    teacher = DiffusersTeacher.from_pretrained(folders[family], **OPTIONS[family])
    pipe = diffusers_pipeline(folders[family])
    x, _ = _inputs(1)
    common = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    if family == "sd3":
        out = pipe(CAPTIONS, guidance_scale=3.0, latents=x.clone(), max_sequence_length=8, **common).images
        w = 3.0
    elif family == "flux":
        out = unpack_latents(pipe(CAPTIONS, guidance_scale=3.5, latents=pack_latents(x), max_sequence_length=8,
                                  **common).images, 8, 8)
        w = 3.5
    else:
        out = unpack_latents(pipe(CAPTIONS, negative_prompt=" ", true_cfg_scale=3.0, latents=pack_latents(x),
                                  **common).images, 8, 8)
        w = 3.0
    sigmas = pipe.scheduler.sigmas
    assert len(sigmas) == 4 and 0 < float(sigmas[1]) < 1
    cond = teacher.condition(CAPTIONS)
    uncond = teacher.null_condition(2, cond)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * teacher.velocity(x, s.expand(2), cond, w, uncond)
    torch.testing.assert_close(x, out, atol=1e-5, rtol=0)


def test_feature_taps_are_the_hooked_blocks_image_tokens_on_the_students_grid(tmp_path, folders):
    """A patch-1 SD3 teacher (8x8 tokens) seen by a patch-2 student (4x4): the "last" tap is the last block's
    image-token output (a forward hook, removed afterwards), each student token the mean of the 2x2 teacher
    tokens it covers; other blocks are taps by module path; the prediction is unchanged by the hooks."""
    teacher = DiffusersTeacher.from_pretrained(save_tiny_sd3(tmp_path / "p1", patch=1), max_sequence_length=8,
                                               feature_patch=2)
    assert teacher.patch == 1 and teacher.feature_width == 16
    cond = teacher.condition(CAPTIONS)
    x, t = _inputs()
    seen = {}
    block = teacher.transformer.transformer_blocks[-1]
    handle = block.register_forward_hook(lambda m, i, out: seen.update(tokens=out[1]))  # (None, image tokens)
    with torch.no_grad():
        v, f = teacher(x, t, cond, features=("last", "transformer_blocks.0"))
        plain = teacher(x, t, cond)
    handle.remove()
    tokens = seen["tokens"]
    assert tokens.shape == (2, 64, 16)
    want = tokens.reshape(2, 4, 2, 4, 2, 16).mean((2, 4)).reshape(2, 16, 16)
    torch.testing.assert_close(f["last"], want, atol=1e-6, rtol=0)
    first = f["transformer_blocks.0"]
    assert first.shape == (2, 16, 16) and (first - f["last"]).abs().max() > 1e-3
    torch.testing.assert_close(v, plain, atol=0, rtol=0)
    assert not block._forward_hooks  # the teacher's hooks are gone
    with pytest.raises(ValueError, match="no module 'transformer_blocks.7'"):
        teacher(x, t, cond, features=("transformer_blocks.7",))
    # same grid: identity; a non-multiple grid: bilinear, still (B, N, D)
    same = torch.randn(2, 16, 3)
    assert match_token_grid(same, (4, 4), (4, 4)) is same
    assert match_token_grid(torch.ones(1, 12, 3), (3, 4), (2, 3)).allclose(torch.ones(1, 6, 3))


def test_dropped_captions_get_the_negative_prompt_and_padding_does_not_change_a_caption(folders):
    """Qwen-Image's text features differ in length (masked): a caption's prediction does not depend on the
    length it is padded to; a caption dropped for the student (CFG dropout) is the teacher's negative prompt;
    after ``prepare_captions`` the text encoders are unloaded and known captions still condition."""
    teacher = DiffusersTeacher.from_pretrained(folders["qwenimage"])
    teacher.prepare_captions(CAPTIONS)
    assert teacher._pipe is None  # text encoders released
    cond = teacher.condition(CAPTIONS, None, [torch.tensor([False, True])])
    null = teacher.null_condition(2, cond)
    assert teacher._pipe is None  # nothing was re-encoded
    mask = cond["encoder_hidden_states_mask"]
    torch.testing.assert_close(cond["encoder_hidden_states"][1], null["encoder_hidden_states"][1], atol=0, rtol=0)
    assert mask[1].equal(null["encoder_hidden_states_mask"][1])
    assert mask[0].sum() != null["encoder_hidden_states_mask"][0].sum()
    full = teacher.condition(CAPTIONS)
    alone = teacher.condition(CAPTIONS[:1])
    lengths = full["encoder_hidden_states_mask"].sum(1)
    assert lengths[1] > lengths[0]
    assert alone["encoder_hidden_states"].shape[1] < full["encoder_hidden_states"].shape[1]
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t, full)[:1], teacher(x[:1], t[:1], alone), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="caption strings"):
        teacher.condition(None, (torch.zeros(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)))
    # a caption not prepared (streamed shards): the encoders are loaded again, and kept
    late = teacher.condition(["dog face"])
    assert teacher._pipe is not None
    fresh = DiffusersTeacher.from_pretrained(folders["qwenimage"]).condition(["dog face"])
    torch.testing.assert_close(late, fresh, atol=0, rtol=0)


def test_teacher_config_errors(tmp_path, folders):
    from snapgen.tasks.teachers import build_teacher

    cpu = torch.device("cpu")
    kw = dict(where="kd.teacher", encoder_dims=[32], student_channels=4, student_patch=2)
    sd3 = {"kind": "diffusers", "path": str(folders["sd3"]), "max_sequence_length": 8}
    with pytest.raises(ValueError, match="kind must be 'snapgen' or 'diffusers'"):
        build_teacher({"kind": "onnx"}, cpu, **kw)
    with pytest.raises(ValueError, match=r"unknown keys in 'kd.teacher': \['text_encdoer'\]"):
        build_teacher({**sd3, "text_encdoer": "x"}, cpu, **kw)
    with pytest.raises(ValueError, match="needs 'path'"):
        build_teacher({"kind": "diffusers"}, cpu, **kw)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_teacher({**sd3, "dtype": "fp8"}, cpu, **kw)
    with pytest.raises(ValueError, match="4-channel latents but the student takes 16.*teacher's VAE"):
        build_teacher(sd3, cpu, **{**kw, "student_channels": 16})
    with pytest.raises(ValueError, match="teacher has no module 'blocks.3'"):
        build_teacher({**sd3, "feature_tap": "blocks.3"}, cpu, **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher({"kind": "diffusers", "path": str(tmp_path / "nowhere")}, cpu, **kw)
    other = tmp_path / "pixart" / "transformer"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match="must be one of.*SD3Transformer2DModel"):
        build_teacher({"kind": "diffusers", "path": str(other.parent)}, cpu, **kw)
    with pytest.raises(ValueError, match=r"missing \['text_encoder_2', 'tokenizer_2'\]"):
        build_teacher({"kind": "diffusers", "transformer": str(folders["sd3"] / "transformer"),
                       "text_encoder": str(folders["sd3"] / "text_encoder"),
                       "tokenizer": str(folders["sd3"] / "tokenizer")}, cpu, **kw)


def test_the_student_must_use_the_teachers_vae(tmp_path, folders):
    """Tiny AutoencoderKLs (read by snapgen's diffusers adapter): the same VAE passes, one with another scaling
    factor is refused with the fix."""
    from diffusers import AutoencoderKL

    from snapgen.tasks.teachers import build_teacher
    from snapgen.vae import load_autoencoder

    for name, scale in (("vae_a", 0.5), ("vae_b", 0.7)):
        AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                      layers_per_block=1, scaling_factor=scale).save_pretrained(tmp_path / name)
    assert load_autoencoder(tmp_path / "vae_a").latent_channels == 4
    spec = {"kind": "diffusers", "path": str(folders["sd3"]), "max_sequence_length": 8,
            "vae": str(tmp_path / "vae_a")}
    kw = dict(where="kd.teacher", encoder_dims=[32], student_channels=4, student_patch=2)
    build_teacher(spec, torch.device("cpu"), student_vae=tmp_path / "vae_a", **kw)
    with pytest.raises(ValueError, match=r"differs from the student's VAE .* in \['scaling_factor'\].*teacher's VAE"):
        build_teacher(spec, torch.device("cpu"), student_vae=tmp_path / "vae_b", **kw)
