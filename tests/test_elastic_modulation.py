"""Per-width modulation (``ThreeStageDiTConfig.elastic_modulation = "per_width"``, issue 21 §1): each elastic
variant owns its timestep MLP and adaLN-single map. It must start exactly as the shared (sliced) model, keep
the widths separate, extract exactly, save/load, and train every width's own copy."""

import json

import pytest
import torch

from helpers.builders import dummy_inputs, perturb_, save_plain_nano_pipeline
from snapgen.elastic import ElasticFlowLoss, extract_variant, make_elastic
from snapgen.elastic.supernet import using_variant
from snapgen.models import IsotropicDiT, ThreeStageDiT, ThreeStageDiTConfig, preset

WIDTHS = ("tiny", "small", "full")
OWN = ("t_embedder.mlp_variants.", "t_block.linear_variants.")  # the per-width modulation copies


def own_params(model, variant):
    return {k: p for k, p in model.named_parameters() if any(k.startswith(o + variant + ".") for o in OWN)}


def run(model, variant, inputs):
    x, t, text, mask = inputs
    with using_variant(model, variant):
        return model(x, t, {"text": text, "text_mask": mask})


@pytest.fixture
def base():
    torch.manual_seed(0)
    return perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full")), std=0.05)


@pytest.fixture
def per_width(base):
    """A per-width supernet whose own modulation copies differ from the full model's slices."""
    model = make_elastic(base, modulation="per_width")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for v in ("tiny", "small"):
            for p in own_params(model, v).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_make_elastic_per_width_computes_what_shared_computes_at_every_width(base):
    shared, per = make_elastic(base), make_elastic(base, modulation="per_width")
    assert shared.config.elastic_modulation == "shared" and per.config.elastic_modulation == "per_width"
    inputs = dummy_inputs(base.config)
    for v in WIDTHS:
        y = run(per, v, inputs)
        assert y.abs().mean() > 1e-2
        assert torch.equal(y, run(shared, v, inputs)), v
    # every variant owns a timestep MLP and an adaLN map, at its own width
    assert set(own_params(per, "tiny")) == {f"{m}.{leaf}" for leaf in ("weight", "bias") for m in (
        "t_embedder.mlp_variants.tiny.0", "t_embedder.mlp_variants.tiny.2", "t_block.linear_variants.tiny")}
    assert per.t_block.linear_variants["small"].weight.shape == (9 * 64, 64)
    assert not own_params(shared, "tiny")


def test_a_fresh_per_width_model_initialises_like_a_shared_one():
    torch.manual_seed(5)
    shared = ThreeStageDiT(preset("nano-elastic"))
    torch.manual_seed(5)
    per = ThreeStageDiT(preset("nano-elastic", elastic_modulation="per_width"))
    per_state = per.state_dict()
    for k, p in shared.state_dict().items():  # no extra random numbers drawn: every shared weight is equal
        assert torch.equal(per_state[k], p), k
    # and the own copies are the full layers' leading slices (tiny: 48 of 128 channels)
    own = per.t_embedder.mlp_variants["tiny"][2].weight
    assert torch.equal(own, shared.t_embedder.mlp[2].weight[:48, :48])


def test_widths_are_separate_and_a_tiny_step_only_reaches_tiny_and_shared_weights(per_width):
    inputs = dummy_inputs(per_width.config, seed=1)
    before = {v: run(per_width, v, inputs) for v in WIDTHS}
    with torch.no_grad():
        for p in own_params(per_width, "tiny").values():
            p.add_(0.1)
    after = {v: run(per_width, v, inputs) for v in WIDTHS}
    assert (after["tiny"] - before["tiny"]).abs().max() > 1e-3
    assert torch.equal(after["small"], before["small"]) and torch.equal(after["full"], before["full"])

    run(per_width, "tiny", inputs).square().mean().backward()
    grads = {k: p.grad for k, p in per_width.named_parameters()}
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in own_params(per_width, "tiny"))
    assert all(grads[k] is None for k in own_params(per_width, "small"))
    # the full width's own modulation is not on tiny's path either; the shared weights are
    for k in ("t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "t_block.1.weight"):
        assert grads[k] is None, k
    assert grads["down_blocks.0.mlp.fc1.weight"].abs().sum() > 0


def test_extraction_is_exact_and_holds_the_variants_own_modulation(per_width, tmp_path):
    inputs = dummy_inputs(per_width.config, seed=2)
    x, t, text, mask = inputs
    for v in WIDTHS:
        sub = extract_variant(per_width, v)
        assert sub.config.elastic_variants == () and sub.config.elastic_modulation == "shared"
        assert sub.config == per_width.config.variant_config(v)
        torch.testing.assert_close(sub(x, t, {"text": text, "text_mask": mask}), run(per_width, v, inputs),
                                   atol=1e-5, rtol=0)
        if v != "full":
            own = per_width.t_block.linear_variants[v].weight
            assert torch.equal(sub.t_block[1].weight, own)
            assert torch.equal(sub.t_embedder.mlp[0].weight, per_width.t_embedder.mlp_variants[v][0].weight)
            w = own.shape[1]
            assert not torch.equal(sub.t_embedder.mlp[2].weight, per_width.t_embedder.mlp[2].weight[:w, :w])
        sub.save_pretrained(tmp_path / v)
        again = ThreeStageDiT.from_pretrained(tmp_path / v)
        cond = {"text": text, "text_mask": mask}
        assert torch.equal(again(x, t, cond), sub(x, t, cond))
    # standalone sizes do not depend on the switch; the supernet holds one extra MLP + adaLN map per variant
    shared = make_elastic(ThreeStageDiT(preset("nano-elastic").variant_config("full")))
    for v in WIDTHS:
        assert extract_variant(per_width, v).num_parameters() == extract_variant(shared, v).num_parameters()
    extra = sum(p.numel() for v in ("tiny", "small") for p in own_params(per_width, v).values())
    assert per_width.num_parameters() == shared.num_parameters() + extra


def test_save_load_round_trip_and_configs_without_the_key(per_width, tmp_path):
    per_width.save_pretrained(tmp_path / "sup")
    assert json.loads((tmp_path / "sup" / "config.json").read_text())["elastic_modulation"] == "per_width"
    loaded = ThreeStageDiT.from_pretrained(tmp_path / "sup")
    assert loaded.config == per_width.config
    inputs = dummy_inputs(per_width.config, seed=4)
    for v in WIDTHS:
        assert torch.equal(run(loaded, v, inputs), run(per_width, v, inputs)), v
    # a config.json written before the key existed loads as "shared"
    d = preset("micro-elastic").to_dict()
    del d["elastic_modulation"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    old = ThreeStageDiTConfig.from_json(tmp_path / "config.json")
    assert old == preset("micro-elastic") and old.elastic_modulation == "shared"


def test_config_errors_and_the_isotropic_family_rejects_per_width():
    with pytest.raises(ValueError, match="elastic_modulation must be one of"):
        preset("nano-elastic", elastic_modulation="separate")
    with pytest.raises(ValueError, match="needs elastic_variants"):
        preset("nano", elastic_modulation="per_width")
    with pytest.raises(ValueError, match="IsotropicDiT is not width-elastic"):
        IsotropicDiT(preset("nano-elastic", elastic_modulation="per_width"))


def test_elastic_training_step_reaches_every_widths_own_modulation(per_width):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16, generator=g)
    text = torch.randn(4, 5, 32, generator=g)
    loss, _, _, metrics = ElasticFlowLoss(num_random=5)(per_width, x0, step=0, generator=g, text=text)
    loss.backward()
    assert set(metrics) == {"fm_full", "fm_tiny", "kd_tiny", "fm_small", "kd_small"}
    for v in ("tiny", "small"):
        own = own_params(per_width, v)
        assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values()), v
    assert per_width.t_block[1].weight.grad.abs().sum() > 0  # the full width's own (the full model's) map


def test_lora_works_on_a_per_width_supernet_but_refuses_its_per_width_layers(per_width):
    from snapgen.nn.lora import add_lora, merge_lora, set_adapter

    inputs = dummy_inputs(per_width.config, seed=6)
    params = add_lora(per_width, "fast", rank=2, alpha=2.0)  # default targets: attention + FFN (shared)
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
    set_adapter(per_width, "fast")
    merged = merge_lora(per_width, "fast")
    for v in WIDTHS:
        torch.testing.assert_close(run(merged, v, inputs), run(per_width, v, inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="per-width modulation layers"):
        add_lora(per_width, "mod", targets=("1",))  # t_block.1
    plain = make_elastic(ThreeStageDiT(preset("nano-elastic").variant_config("full")))
    add_lora(plain, "mod", targets=("1",))  # shared modulation: sliced like any Linear, allowed as before


@pytest.mark.export
def test_onnx_export_of_a_per_width_variant_matches_pytorch(elastic_folder, tmp_path):
    """Export extracts the variant first: its graph holds tiny's own modulation and runs like the supernet."""
    pytest.importorskip("onnxruntime")
    from snapgen.export.onnx import OnnxPipeline, export_onnx
    from snapgen.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(elastic_folder)
    model = make_elastic(extract_variant(pipe.transformer, "full"), modulation="per_width")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in own_params(model, "tiny").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pipe.transformer = model
    pipe.set_variant("tiny")
    export_onnx(pipe, tmp_path / "tiny", progress=False)
    prompts = ["a red circle", "two green hearts"]
    a = OnnxPipeline(tmp_path / "tiny")(prompts, seed=5, return_latents=True)
    b = pipe(prompts, seed=5, return_latents=True)
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_flow_task_warm_starts_a_per_width_supernetwork_from_a_plain_pipeline(tmp_path):
    """model.elastic_modulation: per_width + model.init_from: make_elastic gets the run's setting."""
    from helpers.runs import flow_config

    from snapgen.elastic import repeat_kv_heads
    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    plain = save_plain_nano_pipeline(tmp_path / "src")
    cfg = flow_config(tmp_path, "warm", 2, model={"preset": "nano-elastic", "elastic_modulation": "per_width",
                                                  "init_from": str(tmp_path / "src")})
    sup = Trainer(TrainConfig.from_dict(cfg), progress=False).task.model
    assert sup.config.elastic_modulation == "per_width" and own_params(sup, "tiny")
    shared = make_elastic(repeat_kv_heads(plain, 8))
    inputs = dummy_inputs(sup.config)
    for v in WIDTHS:
        torch.testing.assert_close(run(sup, v, inputs), run(shared, v, inputs), atol=1e-5, rtol=1e-5)
