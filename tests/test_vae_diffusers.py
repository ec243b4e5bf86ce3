"""diffusers VAEs behind snapgen's autoencoder interface (``snapgen.vae.diffusers_adapter``): the Qwen-Image VAE
(``AutoencoderKLQwenImage``, a causal 3-D VAE with per-channel ``latents_mean`` / ``latents_std``), the Wan VAE
(same layout, also Wan 2.2's patchified input) and ``AutoencoderKL`` with SDXL-style per-channel statistics.

Tiny random configs are saved with ``save_pretrained`` and loaded through ``load_autoencoder``. Every expected
value is computed by hand from the diffusers model's own ``encode`` / ``decode`` and the numbers in the saved
``config.json``, one channel at a time; the statistics are chosen so that applying them as scalars, swapping
mean and std, or using 1/std instead of std each change the result by far more than the tolerance.
The last test trains a flow model on a latent cache built with a Qwen-Image VAE and samples the exported
pipeline."""

import json
import shutil

import pytest
import torch
from helpers.fakes import FakeEncoder
from helpers.runs import feature_encoder

from snapgen.vae import DiffusersAutoencoder, load_autoencoder

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

MEAN = [0.4, -0.9, 1.3, -0.2]   # per-channel statistics far from their averages, mean != std, std != 1/std
STD = [0.3, 2.5, 0.8, 1.7]
TOL = 1e-5                     # fp32 rounding of the same arithmetic; the bugs above move values by > 0.1


def qwen(**kw):
    return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                            temperal_downsample=[False], latents_mean=MEAN, latents_std=STD, **kw)


def wan(**kw):
    kw = {"scale_factor_spatial": 2, "scale_factor_temporal": 1, **kw}
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                      temperal_downsample=[False], latents_mean=MEAN, latents_std=STD, **kw)


def sdxl_kl():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.6, latents_mean=MEAN,
        latents_std=STD)


# name -> (builder, factor the diffusers pipeline uses, 3-D model)
KINDS = {
    "qwen": (qwen, 2, True),
    "wan": (wan, 2, True),
    "wan_patched": (lambda: wan(in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=4), 4, True),
    "sdxl_kl": (sdxl_kl, 2, False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for i, (name, (make, _, _)) in enumerate(KINDS.items()):
        torch.manual_seed(i)
        vae = make().eval()
        folder = tmp_path_factory.mktemp(name)
        vae.save_pretrained(folder, safe_serialization=True)
        out[name] = (vae, folder)
    return out


def images(B=2, H=16, W=24, seed=0, T=None):
    shape = (B, 3, H, W) if T is None else (B, 3, T, H, W)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def raw_latent(vae, x, frames):
    """The diffusers model's own posterior mode of images x (B, 3, H, W), frame axis handled as its pipeline."""
    with torch.no_grad():
        if frames:
            return vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        return vae.encode(x).latent_dist.mode()


def hand_normalise(raw, folder):
    """(z - mean) * scale, channel by channel, with the numbers read from the saved config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    sf = cfg.get("scaling_factor", 1.0) if cfg["_class_name"] == "AutoencoderKL" else 1.0
    out = torch.empty_like(raw)
    for c in range(raw.shape[1]):
        out[:, c] = (raw[:, c] - cfg["latents_mean"][c]) * sf / cfg["latents_std"][c]
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_each_class_loads_with_its_pipelines_sizes(saved, name):
    vae, folder = saved[name]
    _, factor, frames = KINDS[name]
    ae = load_autoencoder(folder)
    assert isinstance(ae, DiffusersAutoencoder) and ae.class_name == type(vae).__name__
    assert ae.factor == factor and ae.latent_channels == 4 and ae.image_channels == 3
    if frames:  # the model's own number, which its pipeline uses as vae_scale_factor
        assert ae.factor == vae.spatial_compression_ratio
    assert not any(p.requires_grad for p in ae.parameters())
    # the loaded weights are the saved ones
    for (k, a), b in zip(ae.vae.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), k
    x = images()
    z = ae.encode_latents(x)
    assert z.shape == (2, 4, 16 // factor, 24 // factor) and z.dtype == torch.float32
    out = ae.decode_latents(z)
    assert out.shape == (2, 3, 16, 24) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(KINDS))
def test_encode_normalises_per_channel_and_decode_inverts_it(saved, name):
    vae, folder = saved[name]
    frames = KINDS[name][2]
    ae = load_autoencoder(folder)
    x = images(seed=3)
    raw = raw_latent(vae, x, frames)
    z = ae.encode_latents(x)
    expect = hand_normalise(raw, folder)
    torch.testing.assert_close(z, expect, atol=TOL, rtol=0)
    # the statistics make every plausible mistake visible: scalars, swapped, reciprocal, not applied
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    sf = 0.6 if name == "sdxl_kl" else 1.0
    for wrong in ((raw - m.mean()) * sf / s.mean(), (raw - s) * sf / m, (raw - m) * sf * s, raw):
        assert (wrong - expect).abs().max() > 0.1
    # decode(encode(x)) is the diffusers model's own decode of its own latent
    with torch.no_grad():
        own = vae.decode(raw.unsqueeze(2)).sample[:, :, 0] if frames else vae.decode(raw).sample
    torch.testing.assert_close(ae.decode_latents(z), own, atol=TOL, rtol=0)
    # and any normalised latent is un-normalised per channel before decoding
    zn = torch.randn(1, 4, *z.shape[-2:], generator=torch.Generator().manual_seed(1))
    cfg = json.loads((folder / "config.json").read_text())
    back = torch.stack([zn[:, c] * cfg["latents_std"][c] / sf + cfg["latents_mean"][c] for c in range(4)], 1)
    with torch.no_grad():
        ref = vae.decode(back.unsqueeze(2)).sample[:, :, 0] if frames else vae.decode(back).sample
    torch.testing.assert_close(ae.decode_latents(zn), ref, atol=TOL, rtol=0)


def test_plain_autoencoder_kl_keeps_its_scalar_normalisation(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1).eval()
    vae.save_pretrained(tmp_path, safe_serialization=True)
    ae = load_autoencoder(tmp_path)
    x = images(seed=2)
    torch.testing.assert_close(ae.encode_latents(x), (raw_latent(vae, x, False) - 0.1) * 0.5, atol=TOL, rtol=0)


def test_seeded_posterior_sample(saved):
    vae, folder = saved["qwen"]
    ae = load_autoencoder(folder)
    x = images(seed=6)
    a = ae.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(4))
    b = ae.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    with torch.no_grad():
        dist = vae.encode(x.unsqueeze(2)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(4))
    raw = (dist.mean + dist.std * noise)[:, :, 0]
    torch.testing.assert_close(a, hand_normalise(raw, folder), atol=TOL, rtol=0)
    assert (a - ae.encode_latents(x)).abs().max() > 1e-3


def test_dtype_and_device_move_with_the_module(saved):
    _, folder = saved["qwen"]
    ae = load_autoencoder(folder)
    x = images(seed=7)
    z32 = ae.encode_latents(x)
    ae.to(torch.float64)
    assert ae.dtype == torch.float64 and ae.latents_shift.dtype == torch.float64
    z64 = ae.encode_latents(x)                 # fp32 images are cast to the VAE's dtype
    assert z64.dtype == torch.float64
    torch.testing.assert_close(z64.float(), z32, atol=1e-4, rtol=0)
    assert ae.decode_latents(z64).dtype == torch.float64
    ae.to("meta")                              # stands in for CUDA: buffers and weights all follow
    assert all(t.is_meta for t in [*ae.parameters(), *ae.buffers()])
    assert "latents_shift" not in ae.state_dict()   # the config holds them, not the weights


def test_bad_inputs_name_the_problem(saved):
    ae = load_autoencoder(saved["qwen"][1])
    with pytest.raises(ValueError, match=r"multiple of the autoencoder factor 2"):
        ae.encode_latents(images(1, 15, 16))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 4, 16, 16\)"):
        ae.encode_latents(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="frame axis of this 3-D VAE is added inside"):
        ae.encode_latents(images(1, 16, 16, T=1))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, H, W\)"):
        ae.decode_latents(torch.zeros(1, 3, 8, 8))
    kl = load_autoencoder(saved["sdxl_kl"][1])
    with pytest.raises(ValueError, match=r"must be \(B, 4, H, W\), got \(1, 4, 1, 8, 8\)$"):
        kl.decode_latents(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(TypeError, match="AutoencoderKLQwenImage"):
        DiffusersAutoencoder(torch.nn.Linear(2, 2))


def edited(src, tmp_path, **changes):
    dst = tmp_path / "edited"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_folders_name_the_problem(saved, tmp_path):
    q = saved["qwen"][1]
    with pytest.raises(ValueError, match="one value per channel"):
        load_autoencoder(edited(q, tmp_path, latents_std=STD[:3]))
    with pytest.raises(ValueError, match="no latents_std"):
        load_autoencoder(edited(q, tmp_path, latents_std=None))
    with pytest.raises(ValueError, match="latents_std must be finite and > 0"):
        load_autoencoder(edited(q, tmp_path, latents_std=[1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="ambiguous"):
        load_autoencoder(edited(saved["sdxl_kl"][1], tmp_path, shift_factor=0.2))
    # a config whose factor disagrees with its network (Wan's scale_factor_spatial is a free field)
    wrong = load_autoencoder(edited(saved["wan"][1], tmp_path, scale_factor_spatial=8))
    with pytest.raises(ValueError, match="disagrees with the network"):
        wrong.encode_latents(images(1, 16, 16))
    # a diffusers VAE class without an adapter, and no class at all
    for kind in ("AutoencoderKLQwenImage21", "AutoencoderTiny"):
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": kind}))
        with pytest.raises(ValueError, match=rf"{kind}.*'AutoencoderKL', 'AutoencoderKLQwenImage', "
                                             rf"'AutoencoderKLWan'"):
            load_autoencoder(tmp_path)
        with pytest.raises(ValueError, match="AutoencoderKLWan"):
            DiffusersAutoencoder.from_pretrained(tmp_path)


def test_flow_run_with_a_qwen_image_vae_caches_latents_and_exports_a_pipeline(saved, tmp_path):
    """A tiny flow training whose vae.path is an AutoencoderKLQwenImage folder: the latent cache holds the
    per-channel normalised latents of the dataset's images, and the exported pipeline reloads the VAE and
    decodes its samples with the inverse normalisation."""
    from snapgen.data.base import image_to_tensor
    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.data.mixed import build_dataset
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.tasks import FlowTask
    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    vae, folder = saved["qwen"]
    spec = {"type": "scenes", "length": 8, "resolution": 16}
    cfg = TrainConfig.from_dict({
        "task": "flow", "run_dir": str(tmp_path / "run"), "seed": 0, "steps": 2, "batch_size": 4, "threads": 1,
        "model": {"preset": "nano", "vae_factor": 2}, "vae": {"path": str(folder)},
        "text": {"encoder": feature_encoder(tmp_path, FakeEncoder.dim), "drop_prob": 0.2},
        "data": {"spec": spec, "num_samples": 8, "resolution": 16, "encode_batch": 4},
        "sampling": {"steps": 2, "guidance": 2.0},
        "optim": {"lr": 1e-3, "warmup": 0, "schedule": "constant"},
        "log_every": 1, "ckpt_every": 2, "sample_every": 0})
    task = FlowTask(cfg, torch.device("cpu"), text_encoder=FakeEncoder())
    Trainer(cfg, task=task, progress=False).fit()

    cache = load_latent_cache(tmp_path / "run" / "latents.safetensors")
    x = torch.stack([image_to_tensor(build_dataset(spec)[i].image) for i in range(8)])
    torch.testing.assert_close(cache["latents"], hand_normalise(raw_latent(vae, x, True), folder), atol=TOL, rtol=0)

    final = tmp_path / "run" / "final"
    assert json.loads((final / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLQwenImage"
    pipe = TextToImagePipeline.from_pretrained(final, text_encoder=FakeEncoder())
    assert isinstance(pipe.vae, DiffusersAutoencoder) and pipe.vae_factor == 2
    latents = pipe(["a red circle"], seed=0, return_latents=True)
    assert latents.shape == (1, 4, 8, 8)
    back = torch.stack([latents[:, c] * STD[c] + MEAN[c] for c in range(4)], 1)
    with torch.no_grad():
        ref = vae.decode(back.unsqueeze(2)).sample[:, :, 0]
    torch.testing.assert_close(pipe.vae.decode_latents(latents), ref, atol=TOL, rtol=0)
    (image,) = pipe(["a red circle"], seed=0)
    assert image.size == (16, 16)
