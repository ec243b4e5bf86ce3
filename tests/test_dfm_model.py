"""DFM's model side on the three-stage DiT (snapgen.models.multiscale, ``dfm_levels``): per-level embeddings and
timestep embeddings summed, per-level heads on the same tokens, not-started levels zeroed; a one-level model is
the plain model; plain checkpoints load into the finest level; elastic widths and importance sorting still hold."""

import pytest
import torch

from helpers.builders import dummy_inputs, nano, perturb_
from snapgen.elastic.importance import permute_channels, sort_by_importance
from snapgen.flow.pyramid import Pyramid
from snapgen.models import ThreeStageDiT, preset
from snapgen.sampling.dfm import NOT_STARTED


def model_of(seed=0, **kw):
    torch.manual_seed(seed)
    return perturb_(ThreeStageDiT(nano(**kw)), std=0.05, seed=seed).double()


def packed_inputs(model, B=2, size=(16, 16), seed=0, started=None):
    p = Pyramid(model.config.dfm_levels)
    x, _, text, mask = dummy_inputs(model.config, B=B, h=size[0], w=size[1], seed=seed)
    levels = p.decompose(x.double())
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.rand(B, p.levels, generator=g, dtype=torch.float64).float()
    if started is not None:
        t[:, started:] = NOT_STARTED
    return p, levels, t, {"text": text.double(), "text_mask": mask}


def test_one_level_model_is_the_plain_model():
    plain, one = model_of(), model_of(dfm_levels=1)
    assert one.dfm is None and plain.state_dict().keys() == one.state_dict().keys()
    x, t, text, mask = dummy_inputs(plain.config)
    cond = {"text": text.double(), "text_mask": mask}
    ref = plain(x.double(), t, cond)
    assert torch.equal(one(x.double(), t[:, None], cond), ref)  # a (B, 1) time table is the plain time


def test_embeddings_sum_and_heads_share_the_final_tokens():
    dfm = model_of(dfm_levels=2)
    plain = ThreeStageDiT(nano()).double()
    missing = plain.load_state_dict(dfm.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("dfm.") for k in missing.unexpected_keys)
    p, levels, t, cond = packed_inputs(dfm)
    out = p.unpack(dfm(p.pack(levels), t, cond))
    assert [o.shape for o in out] == [lv.shape for lv in levels]
    # with the coarse level's embedding and timestep MLP silenced, the finest level is the plain model on it
    with torch.no_grad():
        dfm.dfm.embeds[0].weight.zero_(), dfm.dfm.embeds[0].bias.zero_()
        dfm.dfm.t_embedders[0].mlp[2].weight.zero_(), dfm.dfm.t_embedders[0].mlp[2].bias.zero_()
    fine = p.unpack(dfm(p.pack(levels), t, cond))[1]
    torch.testing.assert_close(fine, plain(levels[1], t[:, 1], cond), atol=1e-10, rtol=0)
    # the coarse head reads the same final tokens: it is the coarse FinalLayer of the plain model's last tokens
    _, taps = plain(levels[1], t[:, 1], cond, features=("last",))
    coarse = dfm.dfm.heads[0](taps["last"], plain.t_embedder(t[:, 1]))
    from snapgen.models.three_stage_dit import unpatchify

    torch.testing.assert_close(p.unpack(dfm(p.pack(levels), t, cond))[0], unpatchify(coarse, (8, 8), 1, 4),
                               atol=1e-10, rtol=0)


def test_a_level_not_started_is_zeroed_and_gets_no_weight_gradient():
    model = model_of(dfm_levels=2)
    p, levels, t, cond = packed_inputs(model, started=1)  # the coarse level started, the fine one not
    ref = model(p.pack(levels), t, cond)
    moved = [levels[0], levels[1] + 5.0]
    assert torch.equal(model(p.pack(moved), t, cond), ref)  # its input never reaches the model
    t2 = t.clone()
    t2[:, 1] = 1.0  # the same level started, at pure noise: its input now counts
    assert (model(p.pack(moved), t2, cond) - model(p.pack(levels), t2, cond)).abs().max() > 1e-6
    model(p.pack(levels), t, cond).square().mean().backward()
    # the fine level's patch embedding sees only zeros (its bias still reaches the sum, as the official code)
    assert model.patch_embed.weight.grad.abs().max() == 0 and model.patch_embed.bias.grad.abs().max() > 0
    assert model.dfm.embeds[0].weight.grad.abs().max() > 0
    # a not-started level is embedded at t = 1: NOT_STARTED and a started level at t = 1 with zero input agree
    zero = [levels[0], levels[1] * 0]
    torch.testing.assert_close(model(p.pack(zero), t, cond), model(p.pack(zero), t2, cond), atol=1e-12, rtol=0)


def test_dfm_inputs_and_configs_fail_with_the_fix():
    model = model_of(dfm_levels=2)
    x, t, text, mask = dummy_inputs(model.config)
    cond = {"text": text.double(), "text_mask": mask}
    with pytest.raises(ValueError, match=r"packed pyramid state \(B, 20 = 4 latent channels x 5"):
        model(x.double(), torch.rand(2, 2), cond)
    p = Pyramid(2)
    with pytest.raises(ValueError, match=r"one time per level, t of shape \(2, 2\)"):
        model(p.pack(p.decompose(x.double())), t, cond)
    with pytest.raises(ValueError, match="dfm_levels 3 needs patch_size divisible by 4"):
        nano(dfm_levels=3)
    assert ThreeStageDiT(nano(dfm_levels=3, patch_size=4)).dfm.patch_sizes == [1, 2, 4]


def test_dfm_model_save_load_round_trip(tmp_path):
    model = model_of(dfm_levels=2).float()
    model.save_pretrained(tmp_path / "m")
    back = ThreeStageDiT.from_pretrained(tmp_path / "m")
    assert back.config.dfm_levels == 2
    p, levels, t, cond = packed_inputs(model)
    x = p.pack([lv.float() for lv in levels])
    cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
    assert torch.equal(back(x, t, cond), model(x, t, cond))


def test_elastic_dfm_supernet_and_importance_sorting():
    torch.manual_seed(0)
    sup = perturb_(ThreeStageDiT(preset("nano-elastic", dfm_levels=2)), std=0.05).double()
    p, levels, t, cond = packed_inputs(sup)
    full = sup(p.pack(levels), t, cond)
    sup.set_variant("tiny")
    tiny = sup(p.pack(levels), t, cond)
    assert tiny.shape == full.shape and (tiny - full).abs().max() > 1e-3
    assert sup.dfm.embeds[0].active is not None  # the coarse level's modules are sliced with the rest
    sup.set_variant("full")
    # a dense DFM model sorted by importance (the elastic warm start) computes the same function
    dense = model_of(dfm_levels=2)
    ref = dense(p.pack(levels), t, cond)
    sorted_model, perms = sort_by_importance(dense, return_permutations=True)
    assert "dfm.t_embedders.0.hidden" in perms
    torch.testing.assert_close(sorted_model(p.pack(levels), t, cond), ref, atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(3)
    perm = {"residual": torch.randperm(dense.config.width, generator=g),
            "dfm.t_embedders.0.hidden": torch.randperm(dense.config.width, generator=g)}
    torch.testing.assert_close(permute_channels(dense, perm)(p.pack(levels), t, cond), ref, atol=1e-12, rtol=1e-10)


def test_to_dfm_starts_as_the_plain_model_on_the_recomposed_input():
    from snapgen.models.multiscale import to_dfm
    for cfg in (nano(), preset("nano-elastic")):
        torch.manual_seed(0)
        plain = perturb_(ThreeStageDiT(cfg), std=0.05).double()
        dfm = to_dfm(plain, 2)
        assert dfm.config == cfg.replace(dfm_levels=2)
        p, levels, t, cond = packed_inputs(dfm)
        t[:, 0] = t[:, 1]  # one time for both levels: the plain model's input is the nearest-upsampled sum
        up = torch.nn.functional.interpolate(levels[0], scale_factor=2, mode="nearest") + levels[1]
        for variant in dfm.variants:
            dfm.set_variant(variant), plain.set_variant(variant)
            coarse, fine = p.unpack(dfm(p.pack(levels), t, cond))
            want = plain(up, t[:, 1], cond)
            torch.testing.assert_close(fine, want, atol=1e-10, rtol=0)
            torch.testing.assert_close(coarse, torch.nn.functional.avg_pool2d(want, 2), atol=1e-10, rtol=0)
            assert want.abs().mean() > 1e-3
    with pytest.raises(ValueError, match="converts a plain model"):
        to_dfm(model_of(dfm_levels=2), 2)


def test_flop_count_and_memory_plan_read_a_dfm_model():
    # example inputs come from denoiser_input_shapes: a DFM model gets the packed state, not a latent (it would raise)
    from snapgen.models.summary import count_flops
    from snapgen.train.plan_measure import activation_bytes_per_sample

    plain, dfm = ThreeStageDiT(nano()), ThreeStageDiT(nano(dfm_levels=2))
    fp, fd = count_flops(plain, (4, 16, 16), 5, 32), count_flops(dfm, (4, 16, 16), 5, 32)
    assert fp < fd < 1.05 * fp  # the coarse level's embedding and head only (paper: the same GFLOPs)
    with torch.device("meta"):  # the planner measures on meta tensors
        plain, dfm = ThreeStageDiT(nano()), ThreeStageDiT(nano(dfm_levels=2))
    ap, ad = (activation_bytes_per_sample(m, (4, 16, 16), 5) for m in (plain, dfm))
    assert ap <= ad < 1.2 * ap


def test_the_dfm_loss_at_the_first_stage_trains_no_fine_level_weight():
    # the real model and Algorithm 1's loss at Q = 0: the fine level's head and embedding weights get no gradient
    # (its input is zero and its output is masked), the coarse level's do
    from snapgen.flow.dfm import DecomposableFlowLoss

    model = model_of(dfm_levels=2).float()
    x, _, text, mask = dummy_inputs(model.config)
    out = DecomposableFlowLoss(levels=2).terms(model, x, torch.Generator().manual_seed(0),
                                               cond={"text": text, "text_mask": mask}, stage=0)
    out.loss.backward()
    assert model.final_layer.linear.weight.grad.abs().max() == 0 and model.patch_embed.weight.grad.abs().max() == 0
    assert model.dfm.heads[0].linear.weight.grad.abs().max() > 0 and model.dfm.embeds[0].weight.grad.abs().max() > 0
