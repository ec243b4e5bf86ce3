"""Elastic width: slicing against an independently sliced standalone model, exact extraction, sandwich
sampling, gradients into per-width parameters, and an elastic step that lowers every width's loss."""

import json

import pytest
import torch

from helpers.builders import dummy_inputs, perturb_
from snapgen.elastic import ElasticFlowLoss, WidthWeights, extract_variant, make_elastic, sample_subnetworks
from snapgen.elastic.supernet import using_variant
from snapgen.models import ThreeStageDiT, ThreeStageDiTConfig, preset

# fused axes and their chunk counts, written out by hand (independent of the layers' own slicing rules)
OUT_CHUNKS = {"t_block.1": 9, "upsample.proj": 4}
IN_CHUNKS = {"downsample.proj": 4, "stage_skip.proj": 2, "middle_skips.0.proj": 2}


def reference_state(supernet: ThreeStageDiT, name: str) -> dict:
    """A standalone state dict sliced by hand: leading entries of every axis (per chunk on fused axes), and
    the variant's own modulation tables / QK-norms."""
    full = supernet.state_dict()
    sub = ThreeStageDiT(supernet.config.variant_config(name)).state_dict()
    out = {}
    for key, ref in sub.items():
        if key.endswith("modulation"):
            out[key] = full[key + "_variants." + name]
            continue
        if ".norm_q." in key or ".norm_k." in key:
            mod, norm, leaf = key.rsplit(".", 2)
            out[key] = full[f"{mod}.qk_norm_variants.{name}.{norm}.{leaf}"]
            continue
        t = full[key]
        module = key.rsplit(".", 1)[0]
        for dim, n in enumerate(ref.shape):
            chunks = (OUT_CHUNKS.get(module, 1) if dim == 0 else IN_CHUNKS.get(module, 1) if dim == 1 else 1)
            if t.shape[dim] == n:
                continue
            per, keep = t.shape[dim] // chunks, n // chunks
            t = torch.cat([t.narrow(dim, c * per, keep) for c in range(chunks)], dim=dim)
        out[key] = t.clone()
    return out


@pytest.fixture
def supernet():
    torch.manual_seed(0)
    return perturb_(ThreeStageDiT(preset("nano-elastic")), std=0.05)


def test_slicing_matches_a_hand_sliced_standalone_model(supernet):
    x, t, text, mask = dummy_inputs(supernet.config)
    for name in ("tiny", "small"):
        standalone = ThreeStageDiT(supernet.config.variant_config(name))
        standalone.load_state_dict(reference_state(supernet, name), strict=True)
        with using_variant(supernet, name):
            y = supernet(x, t, {"text": text, "text_mask": mask})
        assert y.abs().mean() > 1e-2  # perturbed weights: a real signal, not zeros
        torch.testing.assert_close(y, standalone(x, t, {"text": text, "text_mask": mask}), atol=1e-5, rtol=1e-5)


def test_extraction_is_exact_and_round_trips(supernet, tmp_path):
    x, t, text, mask = dummy_inputs(supernet.config, seed=1)
    outs = {}
    for name in ("tiny", "small", "full"):
        sub = extract_variant(supernet, name)
        assert not sub.config.elastic_variants
        assert sub.config.width == int(supernet.config.width * supernet.variants[name])
        with using_variant(supernet, name):
            ref = supernet(x, t, {"text": text, "text_mask": mask})
        torch.testing.assert_close(sub(x, t, {"text": text, "text_mask": mask}), ref, atol=1e-5, rtol=0)
        sub.save_pretrained(tmp_path / name)
        again = ThreeStageDiT.from_pretrained(tmp_path / name)
        assert torch.equal(again(x, t, {"text": text, "text_mask": mask}), sub(x, t, {"text": text, "text_mask": mask}))
        outs[name] = ref
    # the widths really are different networks, and sizes grow with width
    assert (outs["tiny"] - outs["full"]).abs().max() > 1e-2
    sizes = [extract_variant(supernet, n).num_parameters() for n in ("tiny", "small", "full")]
    assert sizes[0] < sizes[1] < sizes[2] == sum(
        p.numel() for k, p in supernet.state_dict().items() if "_variants." not in k)


def test_supernet_saves_all_variants_in_one_file(supernet, tmp_path):
    supernet.save_pretrained(tmp_path / "sup")
    loaded = ThreeStageDiT.from_pretrained(tmp_path / "sup")
    x, t, text, mask = dummy_inputs(supernet.config, seed=2)
    for name in ("tiny", "small", "full"):
        with using_variant(supernet, name), using_variant(loaded, name):
            assert torch.equal(loaded(x, t, {"text": text, "text_mask": mask}), supernet(x, t, {"text": text, "text_mask": mask}))
    assert json.loads((tmp_path / "sup" / "config.json").read_text())["elastic_variants"] == [["tiny", 0.375],
                                                                                            ["small", 0.5]]


def test_full_width_ignores_the_variant_tables(supernet):
    x, t, text, mask = dummy_inputs(supernet.config)
    y = supernet(x, t, {"text": text, "text_mask": mask})
    with torch.no_grad():
        for k, p in supernet.named_parameters():
            if "_variants." in k:
                p.add_(1.0)
    assert torch.equal(supernet(x, t, {"text": text, "text_mask": mask}), y)
    with using_variant(supernet, "small"):
        assert supernet.variant == "small"
    assert supernet.variant == "full"


def test_make_elastic_starts_every_width_as_the_leading_slice():
    torch.manual_seed(1)
    base = perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full")))
    sup = make_elastic(base)
    x, t, text, mask = dummy_inputs(base.config)
    assert torch.equal(sup(x, t, {"text": text, "text_mask": mask}), base(x, t, {"text": text, "text_mask": mask}))
    small = extract_variant(sup, "small")
    # its modulation table is the full table's leading columns
    torch.testing.assert_close(small.down_blocks[0].modulation, base.down_blocks[0].modulation[:, :64])
    with pytest.raises(ValueError, match="already elastic"):
        make_elastic(sup)


def test_variant_errors():
    plain = ThreeStageDiT(preset("nano"))
    with pytest.raises(ValueError, match="not an elastic supernetwork"):
        plain.set_variant("small")
    sup = ThreeStageDiT(preset("nano-elastic"))
    with pytest.raises(ValueError, match="unknown variant 'medium'"):
        sup.set_variant("medium")
    with pytest.raises(ValueError, match="width 128 x 0.3 = 38.4 is not whole"):
        preset("nano-elastic", elastic_variants={"odd": 0.3})
    with pytest.raises(ValueError, match="kv_heads 8 x 0.0625 = 0.5 is not whole"):
        preset("nano-elastic", elastic_variants={"one_head": 0.0625})
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        preset("nano-elastic", elastic_variants={"big": 1.5})
    with pytest.raises(ValueError, match="not 'full'"):
        preset("nano-elastic", elastic_variants={"full": 0.5})


def test_config_without_elastic_key_still_loads(tmp_path):
    cfg = preset("nano")
    d = cfg.to_dict()
    del d["elastic_variants"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ThreeStageDiTConfig.from_json(tmp_path / "config.json") == cfg


def test_sandwich_sampling_is_deterministic_and_keeps_the_smallest():
    variants = {"a": 0.25, "b": 0.5, "c": 0.75, "full": 1.0}
    draws = [sample_subnetworks(variants, step, seed=0, num_random=1) for step in range(40)]
    assert all(d[0] == "a" and len(d) == 2 for d in draws)
    assert {d[1] for d in draws} == {"b", "c"}  # both middle widths get trained
    assert draws == [sample_subnetworks(variants, step, seed=0, num_random=1) for step in range(40)]
    assert draws != [sample_subnetworks(variants, step, seed=1, num_random=1) for step in range(40)]
    assert sample_subnetworks(variants, 5, num_random=9) == ["a", "b", "c"]
    assert sample_subnetworks(variants, 5, num_random=0) == ["a"]
    assert sample_subnetworks({"full": 1.0}, 5) == []


def _batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(B, 5, cfg.text_dim, generator=g)
    return x0, text


def test_gradients_reach_each_trained_widths_own_parameters(supernet):
    x0, text = _batch(supernet.config)
    loss_fn = ElasticFlowLoss(num_random=5)
    loss, _, _, metrics = loss_fn(supernet, x0, step=0, generator=torch.Generator().manual_seed(0), text=text)
    loss.backward()
    assert set(metrics) == {"fm_full", "fm_tiny", "kd_tiny", "fm_small", "kd_small"}
    own = {k: p for k, p in supernet.named_parameters() if "_variants." in k}
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values())
    assert supernet.variant == "full"
    # with only the sandwich minimum, "small"'s own tables get no gradient
    supernet.zero_grad(set_to_none=True)
    loss, *_ = ElasticFlowLoss(num_random=0)(supernet, x0, step=0, text=text)
    loss.backward()
    for k, p in own.items():
        assert (p.grad is None) == (".small" in k), k


def test_distillation_targets_the_full_networks_detached_output(supernet):
    """The KD term of a sub-network must not send gradient into the full network's pass."""
    x0, text = _batch(supernet.config)
    g = torch.Generator().manual_seed(0)
    only_kd = ElasticFlowLoss(weights=WidthWeights(full_weight=0.0, subnet_weight=1.0, distill_weight=1.0),
                              num_random=0)
    loss, *_ = only_kd(supernet, x0, step=0, generator=g, text=text)
    loss.backward()
    # parameters used only at full width (columns beyond the tiny slice) get no gradient from tiny's losses
    w = supernet.down_blocks[0].mlp.fc1.weight.grad
    assert w[:, :48].abs().sum() > 0 and w[:, 48:].abs().sum() == 0


def test_elastic_steps_reduce_the_loss_of_every_width():
    torch.manual_seed(0)
    model = ThreeStageDiT(preset("nano-elastic"))
    x0, text = _batch(model.config, B=8)
    x0 = x0.mean(dim=(2, 3), keepdim=True).expand_as(x0).contiguous() * 2  # learnable: flat colour per sample
    fixed_t = torch.linspace(0.1, 0.9, 8)
    fixed_eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

    def width_losses():
        from snapgen.flow import FlowMatchingLoss

        out = {}
        with torch.no_grad():
            for name in model.variants:
                with using_variant(model, name):
                    out[name] = float(FlowMatchingLoss()(model, x0, t=fixed_t, eps=fixed_eps, text=text)[0])
        return out

    before = width_losses()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = ElasticFlowLoss(num_random=1)
    g = torch.Generator().manual_seed(0)
    for step in range(25):
        loss, *_ = loss_fn(model, x0, step, generator=g, text=text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = width_losses()
    for name in model.variants:
        assert after[name] < 0.9 * before[name], (name, before, after)


def test_elastic_loss_refuses_a_plain_model():
    model = ThreeStageDiT(preset("nano"))
    x0, text = _batch(model.config)
    with pytest.raises(ValueError, match="elastic model"):
        ElasticFlowLoss()(model, x0, 0, text=text)


# ----------------------------------------------------------------------------------------- trainer integration
def test_elastic_training_run_logs_every_width_resumes_exactly_and_reports_val_loss(tmp_path):
    from helpers.runs import flow_config, losses, make_cache

    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    val = make_cache(tmp_path / "val.safetensors", n=16, seed=9)

    def cfg(run, steps):
        c = flow_config(tmp_path, run, steps, model={"preset": "nano-elastic"}, elastic={"num_random": 1})
        c["data"].update(val_samples=16, val_cache=str(val))
        return TrainConfig.from_dict(c)

    Trainer(cfg("whole", 8), progress=False).fit()
    Trainer(cfg("split", 4), progress=False).fit()
    Trainer(cfg("split", 8), progress=False).fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    recs = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all({"fm_full", "fm_tiny", "kd_tiny"} <= set(r) for r in recs)
    # the supernetwork is saved whole and reports a validation loss per width
    report = json.loads((tmp_path / "whole" / "final" / "eval.json").read_text())
    assert set(report) == {"val_loss_tiny", "val_loss_small", "val_loss_full"}
    sup = ThreeStageDiT.from_pretrained(tmp_path / "whole" / "final" / "transformer")
    assert sup.variants == {"tiny": 0.375, "small": 0.5, "full": 1.0}


def test_validation_loss_is_deterministic_and_width_specific():
    from helpers.runs import make_cache

    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.text import TextConditioning
    from snapgen.tasks import validation_loss

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cache = load_latent_cache(make_cache(Path(d) / "c.safetensors", n=20))
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(preset("nano-elastic")))
    cond = TextConditioning([32], 32)
    a = validation_loss(model, cond, cache, variant="tiny", batch_size=7)
    assert a == pytest.approx(validation_loss(model, cond, cache, variant="tiny", batch_size=20), rel=1e-6)
    assert a != validation_loss(model, cond, cache, variant="full")
    per = validation_loss(model, cond, cache, variant="tiny", batch_size=7, per_sample=True)
    assert per.shape == (len(cache["latents"]),) and per.dtype == torch.float64
    assert float(per.mean()) == pytest.approx(a, rel=1e-9)
    torch.testing.assert_close(per, validation_loss(model, cond, cache, variant="tiny", batch_size=20,
                                                    per_sample=True), rtol=1e-5, atol=1e-7)
    assert model.variant == "full" and model.training


def test_elastic_section_needs_an_elastic_model(tmp_path):
    from helpers.runs import flow_config

    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    with pytest.raises(ValueError, match="not elastic"):
        Trainer(TrainConfig.from_dict(flow_config(tmp_path, "bad", 2, elastic={"num_random": 1})), progress=False)
    with pytest.raises(ValueError, match="elastic"):
        Trainer(TrainConfig.from_dict(flow_config(tmp_path, "bad2", 2, model={"preset": "nano-elastic"},
                                                  elastic={"num_randm": 1})), progress=False)


def test_repeat_kv_heads_is_exact_and_enables_a_narrow_variant():
    from snapgen.elastic import repeat_kv_heads

    torch.manual_seed(2)
    gqa = perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full").replace(kv_heads=4)))  # group 4
    mha = repeat_kv_heads(gqa, 16)
    x, t, text, mask = dummy_inputs(gqa.config)
    torch.testing.assert_close(mha(x, t, {"text": text, "text_mask": mask}), gqa(x, t, {"text": text, "text_mask": mask}), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        repeat_kv_heads(gqa, 6)
    # 4 KV heads cannot serve the 0.375x variant (1.5 KV heads); 8 can, and make_elastic accepts the result
    sup = make_elastic(repeat_kv_heads(gqa, 8))
    torch.testing.assert_close(sup(x, t, {"text": text, "text_mask": mask}), gqa(x, t, {"text": text, "text_mask": mask}), atol=1e-5, rtol=1e-5)


def test_flow_task_warm_starts_a_supernetwork_from_a_plain_pipeline(tmp_path):
    """model.init_from = an ordinary trained pipeline: the elastic run starts as that exact function."""
    from helpers.runs import flow_config

    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig
    from snapgen.vae import Autoencoder, AutoencoderConfig

    torch.manual_seed(3)
    plain = perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full").replace(kv_heads=4)))
    cond_kw = {"encoder_dims": [32], "out_dim": 32, "drop_probs": [0.2], "null_length": 1}
    cond = perturb_(TextConditioning(**cond_kw))
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    TextToImagePipeline(plain, cond, vae, PipelineConfig(conditioning=cond_kw)).save_pretrained(tmp_path / "src")
    cfg = flow_config(tmp_path, "warm", 2, model={"preset": "nano-elastic", "init_from": str(tmp_path / "src")})
    trainer = Trainer(TrainConfig.from_dict(cfg), progress=False)
    sup = trainer.task.model
    x, t, text, mask = dummy_inputs(sup.config)
    torch.testing.assert_close(sup(x, t, {"text": text, "text_mask": mask}), plain(x, t, {"text": text, "text_mask": mask}), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trainer.task.conditioning.null_embeddings[0], cond.null_embeddings[0])
    bad = flow_config(tmp_path, "bad", 2, model={"preset": "nano", "init_from": str(tmp_path / "src")})
    with pytest.raises(ValueError, match="different config"):
        Trainer(TrainConfig.from_dict(bad), progress=False)


def test_elastic_training_with_zero_subnet_weight_is_standalone_training(tmp_path):
    """Control for the standalone-vs-elastic comparison: with the sub-networks' losses weighted 0, the elastic
    trainer must train its full width exactly as a standalone run of the same architecture (same data, times,
    noise, caption drops and updates), so any gap in that comparison comes from the sub-networks' gradients and
    not from the elastic code path."""
    from helpers.runs import flow_config, losses

    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    base = {"preset": "nano-elastic"}
    Trainer(TrainConfig.from_dict(flow_config(tmp_path, "elastic", 6, model=base,
                                              elastic={"num_random": 1, "subnet_weight": 0.0})),
            progress=False).fit()
    Trainer(TrainConfig.from_dict(flow_config(tmp_path, "plain", 6, model={**base, "elastic_variants": []})),
            progress=False).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert [r["fm_full"] for r in recs] == pytest.approx(list(losses(tmp_path / "plain").values()), rel=1e-5)
    sup = ThreeStageDiT.from_pretrained(tmp_path / "elastic" / "final" / "transformer").state_dict()
    plain = ThreeStageDiT.from_pretrained(tmp_path / "plain" / "final" / "transformer").state_dict()
    assert set(plain) <= set(sup)
    for k, v in plain.items():
        torch.testing.assert_close(sup[k], v, rtol=1e-5, atol=1e-6, msg=k)
