"""What every registered Denoiser must do (snapgen.models.base). A family's test file subclasses
``DenoiserContract`` and fills in ``build`` / ``cond`` / sizes; pytest collects the inherited checks.

    class TestThreeStageDiT(DenoiserContract):
        spec = "snapgenpp/nano"                   # anything build_model accepts
        sizes = [(16, 16), (16, 32), (32, 16)]    # supported latent sizes (any aspect)
        bad_size = (18, 16)                       # unsupported: a clear ValueError
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.builders import perturb_ as perturb

from snapgen.models import MODELS, Denoiser, Elastic, build_model, load_model


def _reload(model, folder):
    """``load_model(folder)`` at the model's active sub-network (the variant is state, not config)."""
    loaded = load_model(folder).eval()
    if isinstance(model, Elastic):
        assert loaded.variant == "full"
        loaded.set_variant(model.variant)
    return loaded


class DenoiserContract:
    spec = None                  # build_model spec
    sizes: list = [(16, 16)]     # latent (h, w) the family supports
    bad_size: tuple | None = None
    batch = 2
    export_atol = 1e-5

    # --- per-family hooks ----------------------------------------------------------------------------
    def build(self, **overrides) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(self.spec, **overrides)

    def cond(self, model, B: int, g: torch.Generator) -> dict:
        """Conditioning of a text-conditioned image family (override for others)."""
        L = 5
        text = torch.randn(B, L, model.config.cond_dims["text"], generator=g)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, L // 2 + 1:] = False
        return {"text": text, "text_mask": mask}

    def inputs(self, model, size=None, B=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        B = B or self.batch
        h, w = size or self.sizes[0]
        x = torch.randn(B, model.config.in_channels, h, w, generator=g)
        t = torch.rand(B, generator=g)
        return x, t, self.cond(model, B, g)

    # --- the contract --------------------------------------------------------------------------------
    def test_registered_and_protocol(self):
        model = self.build()
        assert isinstance(model, Denoiser)
        assert MODELS.get(model.family) is type(model)
        assert "last" in model.feature_taps
        cfg = model.config
        assert cfg.in_channels > 0 and cfg.latent_multiple > 0

    def test_output_exactly_zero_at_init(self):
        model = self.build().eval()
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            assert torch.equal(model(x, t, cond), torch.zeros_like(x))

    def test_any_supported_aspect(self):
        model = perturb(self.build()).eval()
        for size in self.sizes:
            x, t, cond = self.inputs(model, size)
            with torch.no_grad():
                v = model(x, t, cond)
            assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
        if self.bad_size is not None:
            x, t, cond = self.inputs(model, self.bad_size)
            with pytest.raises(ValueError, match="not supported"):
                model(x, t, cond)

    def test_deterministic_and_batch_independent(self):
        model = perturb(self.build()).eval()
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            a, b = model(x, t, cond), model(x, t, cond)
            one = model(x[1:2], t[1:2], {k: v[1:2] for k, v in cond.items()})
        assert torch.equal(a, b)
        torch.testing.assert_close(one, a[1:2], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(a[0], a[1])  # inputs differ, so outputs do

    def test_feature_taps(self):
        model = perturb(self.build()).eval()
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            v = model(x, t, cond)
            v2, feats = model(x, t, cond, features=model.feature_taps)
        assert torch.equal(v, v2)
        assert list(feats) == list(model.feature_taps)
        for name, f in feats.items():
            assert f.shape[0] == x.shape[0] and f.dim() >= 3 and torch.isfinite(f).all(), name
        with pytest.raises(ValueError, match="no feature tap"):
            model(x, t, cond, features=("no_such_tap",))

    def test_unknown_cond_key_is_an_error(self):
        model = self.build().eval()
        x, t, cond = self.inputs(model)
        with pytest.raises(ValueError, match="cond"):
            model(x, t, {**cond, "txet": next(iter(cond.values()))})

    def test_masked_text_tokens_are_ignored(self):
        model = perturb(self.build()).eval()
        x, t, cond = self.inputs(model)
        if "text_mask" not in cond:
            pytest.skip("no text mask in this family's cond")
        pad = ~cond["text_mask"]
        assert pad.any()
        noisy = cond["text"] + 10.0 * pad[..., None] * torch.randn_like(cond["text"])
        with torch.no_grad():
            ref, out = model(x, t, cond), model(x, t, {**cond, "text": noisy})
            unmasked = model(x, t, {"text": noisy})
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(unmasked[0], ref[0], atol=1e-4)  # without the mask the padding would count

    def test_every_parameter_gets_a_gradient(self):
        model = perturb(self.build()).train()
        x, t, cond = self.inputs(model)
        model(x, t, cond).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"parameters without gradient: {missing[:5]}"

    def test_save_load_exact_through_the_registry(self, tmp_path):
        model = perturb(self.build()).eval()
        model.save_pretrained(tmp_path / "m")
        loaded = _reload(model, tmp_path / "m")
        assert type(loaded) is type(model) and loaded.config == model.config
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, cond), model(x, t, cond))

    def test_fp16_save_close(self, tmp_path):
        model = perturb(self.build()).eval()
        model.save_pretrained(tmp_path / "h", dtype=torch.float16)
        loaded = _reload(model, tmp_path / "h")
        assert next(loaded.parameters()).dtype == torch.float32
        x, t, cond = self.inputs(model)
        with torch.no_grad():
            ref, out = model(x, t, cond), loaded(x, t, cond)
        assert (out - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-4

    def test_meta_device_build(self):
        with torch.device("meta"):
            model = build_model(self.spec)
        assert all(p.is_meta for p in model.parameters())
        x, t, cond = self.inputs(model)
        meta = lambda a: a.to("meta")  # noqa: E731
        v = model(meta(x), meta(t), {k: meta(c) for k, c in cond.items()})
        assert v.is_meta and v.shape == x.shape

    def test_exportable_step_graph(self):
        model = perturb(self.build()).eval()
        x, t, cond = self.inputs(model)
        keys = list(cond)

        class Step(torch.nn.Module):  # flat tensors in, velocity out: what export backends trace
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x, t, *c):
                return self.m(x, t, dict(zip(keys, c)))

        with torch.no_grad():
            exported = torch.export.export(Step(model), (x, t, *cond.values()))
            torch.testing.assert_close(exported.module()(x, t, *cond.values()), model(x, t, cond),
                                       rtol=1e-5, atol=self.export_atol)

    def test_legacy_call_form_still_works(self):
        model = perturb(self.build()).eval()
        x, t, cond = self.inputs(model)
        if set(cond) != {"text", "text_mask"}:
            pytest.skip("the legacy positional form exists for text-conditioned image families only")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = model(x, t, cond["text"], cond["text_mask"])
            old_v, old_f = model(x, t, text=cond["text"], text_mask=cond["text_mask"], return_features=True)
            new_v, new_f = model(x, t, cond, features=("last",))
        assert torch.equal(old, new_v) and torch.equal(old_v, new_v) and torch.equal(old_f, new_f["last"])
