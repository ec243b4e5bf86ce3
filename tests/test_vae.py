"""snapgen's autoencoder (shapes, latent normalisation, posterior, save/load, config errors, that it learns)
and ``load_autoencoder``'s dispatch to it or to a diffusers ``AutoencoderKL`` (the other diffusers classes:
test_vae_diffusers.py)."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from snapgen.vae import (
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    DiffusersAutoencoder,
    load_autoencoder,
)


def tiny(**overrides):
    kw = {"channels": (8, 16), "latent_channels": 4, "groups": 4}
    kw.update(overrides)
    return AutoencoderConfig(**kw)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Autoencoder(cfg).eval()


def images(B=2, H=16, W=16, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("channels,latent,hw", [
    ((8,), 4, (8, 12)),                     # factor 1
    ((8, 8), 4, (16, 16)),                  # factor 2
    ((8, 16, 16), 8, (16, 24)),             # factor 4, non-square, 8 latent channels
    ((8, 8, 16, 16), 4, (32, 16)),          # factor 8, tall
])
def test_round_trip_shapes(channels, latent, hw):
    cfg = tiny(channels=channels, latent_channels=latent)
    f = 2 ** (len(channels) - 1)
    ae = build(cfg)
    assert ae.factor == cfg.factor == f and ae.latent_channels == latent
    x = images(2, *hw)
    with torch.no_grad():
        post = ae.encode(x)
        z = post.mode()
        rec = ae.decode(z)
        rec2, post2 = ae(x, sample=False)
    H, W = hw
    assert z.shape == (2, latent, H // f, W // f) and z.dtype == torch.float32
    assert post.logvar.shape == z.shape
    assert rec.shape == x.shape and rec.dtype == torch.float32
    assert torch.equal(rec2, rec) and torch.equal(post2.mean, post.mean)
    assert torch.isfinite(rec).all() and rec.abs().sum() > 0


def test_tiny_decoder_narrower_than_encoder():
    wide = build(tiny(channels=(16, 32, 32)))
    slim_cfg = tiny(channels=(16, 32, 32), decoder_channels=(4, 8, 8))
    slim = build(slim_cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())
    # same encoder, smaller decoder
    assert n(slim.encoder) == n(wide.encoder)
    assert n(slim.decoder) < n(wide.decoder) / 4
    assert slim.decoder.conv_in.out_channels == 8 and slim.decoder.conv_out.in_channels == 4
    x = images(1, 16, 24)
    with torch.no_grad():
        z = slim.encode(x).mode()
        rec = slim.decode(z)
    assert z.shape == (1, 4, 4, 6) and rec.shape == x.shape and rec.dtype == torch.float32


def test_forward_sample_uses_the_generator():
    ae = build(tiny())
    x = images()
    with torch.no_grad():
        a, _ = ae(x, sample=True, generator=torch.Generator().manual_seed(1))
        b, _ = ae(x, sample=True, generator=torch.Generator().manual_seed(1))
        c, _ = ae(x, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------ latent normalisation
def test_encode_decode_latents_apply_shift_and_scale():
    ae = build(tiny(scaling_factor=0.37, shift_factor=-0.21))
    x = images(2, 16, 24)
    with torch.no_grad():
        raw = ae.encode(x).mode()
        zn = ae.encode_latents(x)
        assert torch.allclose(zn, (raw + 0.21) * 0.37, atol=1e-6, rtol=0)
        assert not torch.allclose(zn, raw, atol=1e-3)   # the normalisation is really applied
        # decode_latents undoes it before decoding
        assert torch.allclose(ae.decode_latents(zn), ae.decode(raw), atol=1e-5, rtol=0)
        z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(ae.decode_latents(z), ae.decode(z / 0.37 - 0.21), atol=1e-6, rtol=0)
        # sampled latents: the same noise as the posterior's own sample
        post = ae.encode(x)
        zs = ae.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(5))
        ref = (post.sample(torch.Generator().manual_seed(5)) + 0.21) * 0.37
        assert torch.allclose(zs, ref, atol=1e-6, rtol=0) and not torch.allclose(zs, zn, atol=1e-4)


# ------------------------------------------------------------------------------------------- posterior
def test_diagonal_gaussian_kl_closed_form():
    # mean (1, -2, 0.5), logvar (0, ln 4, -1) in one sample; a second sample at N(0, I) has KL 0
    mean = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), -1.0], [0.0, 0.0, 0.0]])
    moments = torch.cat([mean, logvar], 1)[:, :, None, None]       # (2, 6, 1, 1): mean then logvar channels
    d = DiagonalGaussian(moments)
    hand = 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - math.log(4.0)) + (0.25 + math.exp(-1) - 1 + 1))
    kl = d.kl()
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(hand, rel=1e-6) and kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.equal(d.mode(), mean[:, :, None, None])


def test_diagonal_gaussian_logvar_is_clamped():
    moments = torch.tensor([0.0, 0.0, -100.0, 100.0]).view(1, 4, 1, 1)
    d = DiagonalGaussian(moments)
    assert d.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(d.kl()).all()


def test_diagonal_gaussian_sample_seeded_and_moments():
    C, H, W = 2, 100, 100
    mean = torch.full((1, C, H, W), 3.0)
    mean[:, 1] = -1.0
    logvar = torch.full((1, C, H, W), math.log(0.25))   # std 0.5
    logvar[:, 1] = math.log(4.0)                        # std 2
    d = DiagonalGaussian(torch.cat([mean, logvar], 1))
    a = d.sample(torch.Generator().manual_seed(0))
    b = d.sample(torch.Generator().manual_seed(0))
    c = d.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, mean + torch.exp(0.5 * logvar) * eps, atol=1e-6)
    # 10k samples per channel: mean within ~5 standard errors, variance within 5 %
    for ch, (mu, var) in enumerate([(3.0, 0.25), (-1.0, 4.0)]):
        s = a[:, ch].flatten()
        assert abs(s.mean().item() - mu) < 5 * math.sqrt(var / s.numel())
        assert s.var().item() == pytest.approx(var, rel=0.05)


# -------------------------------------------------------------------------------------------- save/load
def test_save_load_bit_exact(tmp_path):
    cfg = tiny(channels=(8, 16, 16), decoder_channels=(4, 8, 8), scaling_factor=0.8, shift_factor=0.05)
    ae = build(cfg, seed=3)
    ae.save_pretrained(tmp_path / "ae")
    back = Autoencoder.from_pretrained(tmp_path / "ae")
    assert back.config == cfg
    sd, sd2 = ae.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = images(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(ae.encode_latents(x), back.encode_latents(x))
        z = ae.encode_latents(x)
        assert torch.equal(ae.decode_latents(z), back.decode_latents(z))
    # load_autoencoder gives the same thing for a snapgen folder
    via = load_autoencoder(tmp_path / "ae")
    assert type(via) is Autoencoder and via.config == cfg
    assert all(torch.equal(sd[k], v) for k, v in via.state_dict().items())


def test_save_float16_loads_rounded_float32(tmp_path):
    ae = build(tiny(), seed=1)
    ae.save_pretrained(tmp_path, dtype=torch.float16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (no __iter__)
    back = Autoencoder.from_pretrained(tmp_path)
    changed = 0
    for (k, p), q in zip(ae.state_dict().items(), back.state_dict().values()):
        assert q.dtype == torch.float32, k
        assert torch.equal(q, p.half().float()), k
        changed += int(not torch.equal(q, p))
    assert changed > 0  # the rounding really happened (the file is not float32 in disguise)


def test_config_json_round_trip(tmp_path):
    cfg = tiny(channels=(8, 16, 16), decoder_channels=(4, 8, 8), latent_channels=8, blocks_per_level=2,
               scaling_factor=0.3, shift_factor=-0.7)
    cfg.to_json(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["_class_name"] == "Autoencoder" and d["channels"] == [8, 16, 16]
    back = AutoencoderConfig.from_json(tmp_path / "c.json")
    assert back == cfg and isinstance(back.channels, tuple) and isinstance(back.decoder_channels, tuple)
    assert back.factor == 4
    assert AutoencoderConfig.from_dict(tiny().to_dict()) == tiny()   # decoder_channels None survives


@pytest.mark.parametrize("kw,words", [
    ({"channels": (8, 12)}, "groups"),                        # 12 not a multiple of 8 groups
    ({"channels": (8, 16), "groups": 8, "decoder_channels": (8, 10)}, "groups"),
    ({"channels": (8, 16), "groups": 4, "decoder_channels": (8, 8, 8)}, "levels"),
    ({"channels": (), "groups": 4}, "levels"),
    ({"channels": (8, 16), "groups": 4, "scaling_factor": 0.0}, "scaling_factor"),
    ({"channels": (8, 16), "groups": 4, "scaling_factor": -1.0}, "scaling_factor"),
    ({"channels": (8, 16), "groups": 4, "latent_channels": 0}, "positive"),
])
def test_bad_config_is_a_value_error(kw, words):
    with pytest.raises(ValueError, match=words):
        AutoencoderConfig(**kw)


def test_bad_inputs_are_clear_value_errors():
    ae = build(tiny(channels=(8, 16, 16)))   # factor 4
    with pytest.raises(ValueError, match=r"multiple of the autoencoder factor 4.*28x36"):
        ae.encode(images(1, 30, 37))
    with pytest.raises(ValueError, match=r"factor 4.*4x4"):   # smaller than the factor: smallest valid size
        ae.encode_latents(images(1, 2, 3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ae.decode_latents(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError):
        Autoencoder({"channels": (8, 16)})


# ---------------------------------------------------------------------------------------------- learning
def blobs(n=4, size=16, seed=0):
    """Smooth images: two soft coloured Gaussian blobs on a coloured background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        im = (torch.rand(3, 1, 1, generator=g) * 0.6 - 0.3).expand(3, size, size).clone()
        for _ in range(2):
            cy, cx = torch.rand(2, generator=g) * 0.6 + 0.2
            r = 0.12 + 0.1 * torch.rand((), generator=g)
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
            w = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
            im = im * (1 - w) + colour * w
        out.append(im)
    return torch.stack(out).clamp(-1, 1)


def psnr(a, b):
    return 10 * math.log10(4.0 / torch.mean((a - b) ** 2).item())   # data range 2


def test_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    ae = Autoencoder(tiny(channels=(8, 16)))
    x = blobs()
    with torch.no_grad():
        before = psnr(ae(x, sample=False)[0], x)
    enc0 = ae.encoder.conv_in.weight.detach().clone()
    dec0 = ae.decoder.conv_out.weight.detach().clone()
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(150):
        rec, post = ae(x, sample=False)
        loss = torch.mean((rec - x) ** 2) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # gradients reach both ends of the network
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0 and ae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert not torch.equal(ae.encoder.conv_in.weight, enc0) and not torch.equal(ae.decoder.conv_out.weight, dec0)
    with torch.no_grad():
        after = psnr(ae(x, sample=False)[0], x)
    assert after > before + 10, (before, after)   # typically ~12 dB -> ~38 dB


# ------------------------------------------------------------------------------ load_autoencoder dispatch
@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1).eval()
    folder = tmp_path_factory.mktemp("dvae")
    vae.save_pretrained(folder, safe_serialization=True)
    return vae, folder


def test_load_autoencoder_diffusers(diffusers_vae):
    vae, folder = diffusers_vae
    ae = load_autoencoder(folder)
    assert isinstance(ae, DiffusersAutoencoder)
    assert ae.factor == 2 and ae.latent_channels == 4
    assert ae.latents_scale.tolist() == [0.5] * 4 and ae.latents_shift.tolist() == pytest.approx([0.1] * 4)
    assert not any(p.requires_grad for p in ae.parameters())
    x = images(2, 16, 24, seed=4)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
        z = ae.encode_latents(x)
        assert z.shape == (2, 4, 8, 12)
        # the loaded weights are the saved ones, and the config's normalisation is applied
        assert torch.allclose(z, (raw - 0.1) * 0.5, atol=1e-5, rtol=0)
        zz = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        ref = vae.decode(zz / 0.5 + 0.1).sample
        out = ae.decode_latents(zz)
    assert out.shape == (1, 3, 16, 24)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, vae.decode(zz).sample, atol=1e-3)   # normalisation really inverted


def test_load_autoencoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(tmp_path)                           # empty folder
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"_class_name": "Autoenc')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('{"latent_channels": 4}')   # no _class_name at all
    with pytest.raises(ValueError, match="None"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text('[1, 2]')                   # valid JSON, not an object
    with pytest.raises(ValueError):
        load_autoencoder(tmp_path)


def test_load_autoencoder_snapgen_folder_with_corrupt_weights(tmp_path):
    build(tiny()).save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        load_autoencoder(tmp_path)
