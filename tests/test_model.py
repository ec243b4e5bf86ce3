"""ThreeStageDiT: shapes, init, gradients, save/load, errors, determinism, presets."""

import json

import pytest
import torch
from helpers.builders import dummy_inputs, nano, perturb_

from snapgen.models import PAPER_PARAMS, PRESETS, IsotropicDiT, ThreeStageDiT, ThreeStageDiTConfig, preset


@pytest.mark.parametrize("h,w", [(16, 16), (8, 24), (24, 12), (4, 4), (20, 36)])
@pytest.mark.parametrize("attention,tile", [("assa", (2, 0)), ("assa", (2, 2)), ("dense", (2, 0))])
def test_output_shape_any_aspect(h, w, attention, tile):
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano(outer_attention=attention, bna_tile=tile)))
    x, t, text, mask = dummy_inputs(model.config, h=h, w=w)
    out = model(x, t, {"text": text, "text_mask": mask})
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_new_model_outputs_exactly_zero(nano_model):
    x, t, text, mask = dummy_inputs(nano_model.config)
    assert torch.equal(nano_model(x, t, {"text": text, "text_mask": mask}), torch.zeros_like(x))
    iso = IsotropicDiT(nano())
    assert torch.equal(iso(x, t, {"text": text, "text_mask": mask}), torch.zeros_like(x))


def test_blocks_are_identity_at_init(nano_model):
    """adaLN-Zero: with every gate at zero a block returns its input unchanged."""
    x, t, text, mask = dummy_inputs(nano_model.config)
    tokens = torch.randn(2, 64, nano_model.config.width)
    cond = torch.zeros(2, 9, nano_model.config.width)
    from snapgen.attention import grid_positions, rope_angles
    rope = rope_angles(grid_positions(8, 8), 16)
    rope_c = rope_angles(grid_positions(4, 4, stride=2, offset=0.5), 16)
    blk = nano_model.down_blocks[0]
    assert torch.equal(blk(tokens, cond, (8, 8), rope, rope_c, nano_model.text_norm(text), mask), tokens)


@pytest.mark.parametrize("model_cls", [ThreeStageDiT, IsotropicDiT])
def test_every_parameter_gets_a_gradient_after_perturbation(model_cls):
    torch.manual_seed(0)
    model = perturb_(model_cls(nano()))
    x, t, text, mask = dummy_inputs(model.config)
    model(x, t, {"text": text, "text_mask": mask}).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_zero_init_still_trains_gates(nano_model):
    """At init only the gates/output layer are reachable; they must get gradient so training can start."""
    x, t, text, mask = dummy_inputs(nano_model.config)
    (nano_model(x, t, {"text": text, "text_mask": mask}) - x).square().mean().backward()
    assert nano_model.final_layer.linear.weight.grad.abs().sum() > 0


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano()))
    model.save_pretrained(tmp_path / "m")
    loaded = ThreeStageDiT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x, t, text, mask = dummy_inputs(model.config)
    assert torch.equal(model(x, t, {"text": text, "text_mask": mask}), loaded(x, t, {"text": text, "text_mask": mask}))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_config_json_round_trip_and_key_errors(tmp_path):
    cfg = nano(bna_tile=(2, 0), depths=(1, 3, 2))
    cfg.to_json(tmp_path / "c.json")
    assert ThreeStageDiTConfig.from_json(tmp_path / "c.json") == cfg
    d = json.loads((tmp_path / "c.json").read_text())
    with pytest.raises(ValueError, match="unknown ThreeStageDiTConfig keys \\['hidden_size'\\]"):
        ThreeStageDiTConfig.from_dict({**d, "hidden_size": 3})
    del d["width"]
    with pytest.raises(ValueError, match="missing keys \\['width'\\]"):
        ThreeStageDiTConfig.from_dict(d)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        ThreeStageDiT.from_pretrained(tmp_path / "nope")
    model = ThreeStageDiT(nano())
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ThreeStageDiT.from_pretrained(tmp_path / "m")
    # weights from another config
    ThreeStageDiT(nano(width=96, head_dim=16, kv_heads=2)).save_pretrained(tmp_path / "other")
    model.config.to_json(tmp_path / "other" / "config.json")
    with pytest.raises(ValueError, match="wrong shape"):
        ThreeStageDiT.from_pretrained(tmp_path / "other")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ThreeStageDiT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ThreeStageDiT.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("h,w,needle", [(18, 16, "height \\[16, 20\\]"), (16, 2, "width \\[4\\]"),
                                        (15, 17, "images \\[96, 128\\] x \\[128, 160\\]")])
def test_bad_latent_size_names_nearest_valid(nano_model, h, w, needle):
    x, t, text, mask = dummy_inputs(nano_model.config)
    with pytest.raises(ValueError, match=needle):
        nano_model(torch.randn(2, 4, h, w), t, text, mask)


def test_bad_inputs(nano_model):
    x, t, text, mask = dummy_inputs(nano_model.config)
    with pytest.raises(ValueError, match="channels"):
        nano_model(torch.randn(2, 3, 16, 16), t, text, mask)
    with pytest.raises(ValueError, match="text must be"):
        nano_model(x, t, {"text": text[..., :7], "text_mask": mask})
    with pytest.raises(ValueError, match="text_mask must be"):
        nano_model(x, t, {"text": text, "text_mask": mask[:, :2]})
    with pytest.raises(ValueError, match="t must be"):
        nano_model(x, torch.rand(3), {"text": text, "text_mask": mask})
    assert nano_model(x, 0.3, {"text": text, "text_mask": mask}).shape == x.shape  # scalar t broadcasts


@pytest.mark.parametrize("bad,needle", [
    (dict(width=60), "multiple of head_dim"), (dict(kv_heads=3), "multiple of kv_heads"),
    (dict(depths=(1, 2)), "three non-negative"), (dict(outer_attention="linear"), "outer_attention"),
    (dict(head_dim=6, width=60), "divisible by 4"), (dict(bna_backend="natten"), "bna_backend"),
])
def test_bad_configs(bad, needle):
    with pytest.raises(ValueError, match=needle):
        nano(**bad)


def test_text_padding_is_ignored(nano_model):
    perturb_(nano_model)
    x, t, text, mask = dummy_inputs(nano_model.config)
    out = nano_model(x, t, {"text": text, "text_mask": mask})
    text2 = text.clone()
    text2[~mask] = 50.0
    torch.testing.assert_close(nano_model(x, t, {"text": text2, "text_mask": mask}), out)
    text3 = text.clone()
    text3[mask] += 1.0
    assert not torch.allclose(nano_model(x, t, {"text": text3, "text_mask": mask}), out)


def test_deterministic_under_seed():
    def run():
        torch.manual_seed(123)
        m = perturb_(ThreeStageDiT(nano()), seed=7)
        return m(*dummy_inputs(m.config))

    assert torch.equal(run(), run())


def test_backends_agree_inside_the_model():
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano(bna_tile=(2, 2))))
    x, t, text, mask = dummy_inputs(model.config, h=12, w=20)  # 6x10 grid: tiles do not divide -> padding
    ref = ThreeStageDiT(nano(bna_tile=(2, 2), bna_backend="reference"))
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x, t, {"text": text, "text_mask": mask}), ref(x, t, {"text": text, "text_mask": mask}), rtol=1e-5, atol=1e-6)


def test_paper_presets_param_counts_within_15_percent():
    for name in ("tiny", "small", "full"):
        with torch.device("meta"):
            n = ThreeStageDiT(PRESETS[name]).num_parameters()
        assert abs(n / PAPER_PARAMS[name] - 1) <= 0.15, (name, n)
    widths = {n: PRESETS[n].width for n in ("tiny", "small", "full")}
    assert widths["tiny"] / widths["full"] == 0.375 and widths["small"] / widths["full"] == 0.5
    assert PRESETS["small"].kv_heads == 8  # the paper's GQA setting


def test_preset_unknown_name():
    with pytest.raises(KeyError, match="available"):
        preset("huge")


def test_torch_export_matches_eager_and_leaves_eager_intact():
    """The gather backend has no data-dependent control flow, so torch.export captures it; tracing must not
    leave fake tensors in the index caches that later eager calls would pick up."""
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano(bna_tile=(2, 2)))).eval()
    x, t, text, mask = dummy_inputs(model.config, h=16, w=24)
    exported = torch.export.export(model, (x, t, {"text": text, "text_mask": mask}))
    torch.testing.assert_close(exported.module()(x, t, {"text": text, "text_mask": mask}),
                               model(x, t, {"text": text, "text_mask": mask}))
    out = model(x, t, {"text": text, "text_mask": mask})
    assert type(out) is torch.Tensor and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(nano()))
    x, t, text, mask = dummy_inputs(model.config)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, {"text": text, "text_mask": mask}).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
