"""Importance-sorted elastic warm start (snapgen.elastic.importance): the sorted dense model is the same function,
the sub-networks keep the most important channels, and the flow task's model.sort_by_importance reaches it."""

import pytest
import torch

from helpers.builders import dummy_inputs, perturb_, save_plain_nano_pipeline
from snapgen.elastic import extract_variant, make_elastic, repeat_kv_heads
from snapgen.elastic.importance import (channel_importance, importance_plan, importance_permutations,
                                        permute_channels, sort_by_importance)
from snapgen.elastic.supernet import using_variant
from snapgen.models import ThreeStageDiT, preset

CONFIGS = {  # GQA groups 2 / 2 / 4 / 1 (MHA), ASSA outer stages (micro's block types) and the dense ablation
    "nano": preset("nano"),
    "nano-elastic-full": preset("nano-elastic").variant_config("full"),
    "micro": preset("micro"),
    "dense-gqa4-noskips": preset("nano-elastic").variant_config("full").replace(
        kv_heads=4, outer_attention="dense", middle_skips=False, stage_skip=False),
    "mha": preset("nano", kv_heads=4),
}


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(ThreeStageDiT(cfg), std=0.05, seed=seed).double()


def run(model, seed=0):
    x, t, text, mask = dummy_inputs(model.config, seed=seed)
    return model(x.double(), t, {"text": text.double(), "text_mask": mask})


def random_permutations(model, seed=0):
    """A random permutation of every axis; query heads follow a random KV-group order, shuffled inside groups."""
    g = torch.Generator().manual_seed(seed)
    plan = importance_plan(model)
    perms = {n: torch.randperm(a.size, generator=g) for n, a in plan.items() if a.kv_axis is None}
    for n, a in plan.items():
        if a.kv_axis is not None:
            perms[n] = torch.cat([kv * a.group + torch.randperm(a.group, generator=g)
                                  for kv in perms[a.kv_axis].tolist()])
    return perms


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sorted_model_computes_the_same_function(name):
    model = random_model(CONFIGS[name])
    sorted_model, perms = sort_by_importance(model, return_permutations=True)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())  # something really moved
    ref = run(model)
    assert ref.abs().mean() > 1e-2
    torch.testing.assert_close(run(sorted_model), ref, atol=1e-12, rtol=1e-10)
    # every axis permuted at random (not only the importance order) is the same function too
    torch.testing.assert_close(run(permute_channels(model, random_permutations(model))), ref, atol=1e-12, rtol=1e-10)
    assert sorted_model is not model and torch.equal(run(model), ref)  # the input model is left alone


def test_sorting_is_exact_in_fp32_with_the_default_attention_backend():
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(CONFIGS["nano"]), std=0.05)
    x, t, text, mask = dummy_inputs(model.config)
    c = {"text": text, "text_mask": mask}
    torch.testing.assert_close(sort_by_importance(model)(x, t, c), model(x, t, c), atol=1e-5, rtol=1e-5)


def test_query_heads_must_stay_with_their_kv_group():
    model = random_model(CONFIGS["nano"])  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="GQA group"):
        permute_channels(model, {"down_blocks.0.attn.heads": torch.tensor([1, 2, 0, 3])})
    with pytest.raises(ValueError, match="not a permutation"):
        permute_channels(model, {"residual": torch.zeros(64, dtype=torch.long)})


def test_an_unknown_parameter_is_an_error_not_left_unpermuted():
    model = random_model(CONFIGS["nano"])
    model.down_blocks[0].extra = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(RuntimeError, match="does not know how to permute"):
        sort_by_importance(model)
    with pytest.raises(ValueError, match="dense"):
        sort_by_importance(ThreeStageDiT(preset("nano-elastic")))


def test_lora_adapters_move_with_their_layers():
    model = random_model(CONFIGS["nano"])
    for lin in (model.down_blocks[0].mlp.fc1, model.middle_blocks[1].attn.to_out, model.t_block[1]):
        lora = lin.add_adapter("style", rank=2, alpha=2.0)
        torch.nn.init.normal_(lora.B, std=0.1)
        lin.active_adapter = "style"
    torch.testing.assert_close(run(sort_by_importance(model)), run(model), atol=1e-12, rtol=1e-10)


def _l1_blocks(w: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """L1 norm of consecutive ``block``-wide slices along ``dim`` (written out here, not taken from the plan)."""
    w = w.detach().abs().movedim(dim, 0)
    return w.reshape(w.shape[0] // block, -1).sum(1)


def test_sub_networks_keep_the_most_important_channels():
    cfg = preset("nano-elastic")
    base = random_model(cfg.variant_config("full"), seed=1)
    scores = channel_importance(base)
    perms = importance_permutations(base)
    sup = make_elastic(base, cfg.elastic_variants, sort=True)
    hd = cfg.head_dim
    for name, ratio in cfg.elastic_variants:
        # residual channels: the kept ones are the top of the original model's importance
        keep = round(cfg.width * ratio)
        kept, dropped = scores["residual"][perms["residual"][:keep]], scores["residual"][perms["residual"][keep:]]
        assert kept.min() >= dropped.max()
        for blk in [*sup.down_blocks, *sup.middle_blocks, *sup.up_blocks]:
            fc2 = _l1_blocks(blk.mlp.fc2.weight, 1, 1)  # FFN hidden units, in the supernet's (sorted) order
            k = round(len(fc2) * ratio)
            assert fc2[:k].min() >= fc2[k:].max()
            cross = _l1_blocks(blk.cross_attn.to_out.weight, 1, hd)  # whole heads
            k = round(len(cross) * ratio)
            assert cross[:k].min() >= cross[k:].max()
            group = blk.attn.heads // blk.attn.kv_heads  # GQA groups: sum over the group's query heads
            groups = _l1_blocks(blk.attn.to_out.weight, 1, hd * group)
            k = round(len(groups) * ratio)
            assert groups[:k].min() >= groups[k:].max()
    # and the sorted supernetwork's full width is still the original model
    torch.testing.assert_close(run(sup), run(base), atol=1e-12, rtol=1e-10)


def _scale_units_(t: torch.Tensor, dim: int, chunks: int, block: int, factors: torch.Tensor) -> None:
    shape = list(t.shape)
    units = shape[dim] // (chunks * block)
    view = t.view(shape[:dim] + [chunks, units, block] + shape[dim + 1:])
    view.mul_(factors.to(t.dtype).reshape([1] * (dim + 1) + [units, 1] + [1] * (len(shape) - dim - 1)))


@torch.no_grad()
def important_last(cfg, seed=2, small=0.1):
    """A random model whose leading half of every axis is made unimportant: residual channels scaled by ``small`` in
    every tensor that reads or writes them, FFN units / heads / GQA groups / timestep-hidden units through the
    next layer's columns. The important units are the second half, where the unsorted leading slice drops them."""
    model = random_model(cfg, seed=seed)
    params = dict(model.named_parameters())
    for name, axis in importance_plan(model).items():
        if not axis.score:  # KV axes: their groups are made unimportant through their query heads' to_out columns
            continue
        f = torch.ones(axis.size, dtype=torch.float64)
        f[:axis.size // 2] = small
        for u in axis.uses if name == "residual" else axis.score:
            _scale_units_(params[u.param], u.dim, u.chunks, u.block, f)
    return model


def test_sorting_finds_important_channels_placed_last_and_lowers_the_sub_network_error():
    cfg = preset("nano-elastic")
    base = important_last(cfg.variant_config("full"))
    for name, perm in importance_permutations(base).items():  # the first half after sorting = the important half
        n = len(perm)
        assert set(perm[:n // 2].tolist()) == set(range(n // 2, n)), name
    full = run(base)
    plain, ranked = make_elastic(base, cfg.elastic_variants), make_elastic(base, cfg.elastic_variants, sort=True)
    for name, _ in cfg.elastic_variants:
        with using_variant(plain, name), using_variant(ranked, name):
            err_plain = ((run(plain) - full).norm() / full.norm()).item()
            err_sorted = ((run(ranked) - full).norm() / full.norm()).item()
        # measured: tiny 0.65 vs 1.00, small 0.30 vs 1.00
        assert err_sorted < 0.8 * err_plain, (name, err_sorted, err_plain)
        torch.testing.assert_close(run(extract_variant(ranked, name)), run(ranked.set_variant(name)), atol=1e-12,
                                   rtol=0)
        ranked.set_variant("full")


def _warm_start_folder(tmp_path):
    return save_plain_nano_pipeline(tmp_path / "src")


def test_flow_task_switch_reaches_make_elastic(tmp_path):
    from helpers.runs import flow_config

    from snapgen.train import Trainer
    from snapgen.train.config import TrainConfig

    plain = _warm_start_folder(tmp_path)
    src = str(tmp_path / "src")
    # plain -> 8 KV heads (exact) -> supernetwork, sorted or not, as the task does it
    expected = {s: make_elastic(repeat_kv_heads(plain, 8), preset("nano-elastic").elastic_variants, sort=s).state_dict()
                for s in (False, True)}
    models = {}
    switches = {"default": {}, "off": {"sort_by_importance": False}, "on": {"sort_by_importance": True}}
    for run_name, extra in switches.items():
        cfg = flow_config(tmp_path, run_name, 2, model={"preset": "nano-elastic", "init_from": src, **extra})
        models[run_name] = Trainer(TrainConfig.from_dict(cfg), progress=False).task.model.state_dict()
    for run_name, s in (("default", False), ("off", False), ("on", True)):
        for k, v in expected[s].items():
            assert torch.equal(models[run_name][k], v), (run_name, k)
    assert not torch.equal(models["on"]["t_block.1.weight"], models["off"]["t_block.1.weight"])
    # `snapgen plan` reads the same model: section: the switch is a warm-start key, not a config field
    from snapgen.train.plan_tasks import plan_config

    plans = [plan_config(TrainConfig.from_dict(flow_config(tmp_path, "p", 2, model={
        "preset": "nano-elastic", "init_from": src, **extra})), 1, resolution=64).resident
             for extra in ({}, {"sort_by_importance": True})]
    assert plans[0] == plans[1] > 0
    # misuse is an error: a non-boolean, no warm start, or a run model that is not elastic
    for run_name, model in (("bad1", {"preset": "nano-elastic", "init_from": src, "sort_by_importance": "yes"}),
                            ("bad2", {"preset": "nano-elastic", "sort_by_importance": True}),
                            ("bad3", {"preset": "nano-elastic", "init_from": str(tmp_path / "src"),
                                      "elastic_variants": [], "kv_heads": 4, "sort_by_importance": True})):
        with pytest.raises(ValueError, match="sort_by_importance"):
            Trainer(TrainConfig.from_dict(flow_config(tmp_path, run_name, 2, model=model)), progress=False)
