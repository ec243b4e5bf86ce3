"""DFM through the flow task (``flow.objective: dfm`` with a ``dfm_levels`` model): a tiny model trains with every
stage's loss going down, logged per stage and level; runs resume exactly; misconfigurations fail with the fix."""

import json

import pytest
import torch
from helpers.runs import flow_config, losses

from snapgen.data.latent_cache import save_latent_cache
from snapgen.tasks import build_task
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig


def learnable_cache(path, n=48, seed=0):
    """4 captions, each with its own fixed latent (coarse structure and fine detail): a model can learn every
    pyramid level of them (the default test cache is i.i.d. noise, nothing to learn at the fine level)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(4, 4, 8, 8, generator=g)
    idx = torch.arange(n) % 4
    tokens = torch.randn(4, 5, 32, generator=g)
    return save_latent_cache(path, patterns[idx], idx, tokens, torch.ones(4, 5, dtype=torch.bool),
                             [f"pattern {i}" for i in range(4)])


def dfm_run(tmp_path, run, steps, **flow):
    cfg = flow_config(tmp_path, run, steps, model={"preset": "nano", "dfm_levels": 2},
                      flow={"objective": "dfm", "stage_probs": [0.5, 0.5], **flow})
    cfg["data"] = {"cache": str(learnable_cache(tmp_path / "patterns.safetensors"))}
    cfg["text"]["drop_prob"] = 0.0
    return TrainConfig.from_dict(cfg)


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_a_tiny_dfm_model_trains_on_every_stage(tmp_path):
    Trainer(dfm_run(tmp_path, "run", 160), progress=False).fit()
    recs = [r for r in records(tmp_path / "run") if "loss" in r]
    for q in (0, 1):
        per = [r[f"loss_stage{q}"] for r in recs if f"loss_stage{q}" in r]
        assert len(per) >= 20, q  # both stages drawn (p = 0.5 each)
        first, last = sum(per[:8]) / 8, sum(per[-8:]) / 8
        assert last < 0.8 * first, (q, first, last)
        mine = [r for r in recs if f"loss_stage{q}" in r]
        assert {k for k in mine[-1] if k.startswith(f"loss_stage{q}_level")} == \
            {f"loss_stage{q}_level{s}" for s in range(q + 1)}
        for s in range(q + 1):  # every level of the stage learns (the fine level too)
            lv = [r[f"loss_stage{q}_level{s}"] for r in mine]
            assert sum(lv[-8:]) < 0.9 * sum(lv[:8]), (q, s)
    assert "loss_per_bin" in recs[-1]


def test_dfm_run_resumes_exactly(tmp_path):
    Trainer(dfm_run(tmp_path, "full", 6), progress=False).fit()
    Trainer(dfm_run(tmp_path, "part", 3), progress=False).fit()
    Trainer(dfm_run(tmp_path, "part", 6), progress=False).fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6


def test_dfm_config_errors_name_the_fix(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="set flow.objective: dfm"):
        build_task(TrainConfig.from_dict(flow_config(tmp_path, "a", 1, model={"preset": "nano", "dfm_levels": 2})),
                   cpu)
    with pytest.raises(ValueError, match="flow.stage_probs is a setting of flow.objective: dfm"):
        build_task(TrainConfig.from_dict(flow_config(tmp_path, "b", 1, flow={"stage_probs": [1.0]})), cpu)
    with pytest.raises(ValueError, match="2 non-negative probabilities summing to 1"):
        build_task(dfm_run(tmp_path, "c", 1, stage_probs=[0.9, 0.2]), cpu)
    with pytest.raises(ValueError, match="flow.objective must be one of"):
        build_task(dfm_run(tmp_path, "d", 1, objective="pyramid"), cpu)


def test_dfm_validation_is_fixed_per_stage_and_one_level_is_plain_flow_matching(tmp_path):
    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.flow import FlowMatchingLoss
    from snapgen.flow.dfm import DecomposableFlowLoss
    from snapgen.tasks.validation import dfm_validation_losses, validation_loss

    cfg = dfm_run(tmp_path, "v", 2)
    cfg.data.update(val_samples=48, val_cache=cfg.data["cache"])
    task = build_task(cfg, torch.device("cpu"))
    task.prepare(tmp_path / "v")
    a, b = task.evaluate(), task.evaluate()
    assert a == b and set(a) == {"val_loss_full", "val_loss_full_stage0", "val_loss_full_stage1"}
    assert a["val_loss_full"] == pytest.approx(0.5 * a["val_loss_full_stage0"] + 0.5 * a["val_loss_full_stage1"],
                                               abs=2e-6)
    assert a["val_loss_full_stage1"] > a["val_loss_full_stage0"] > 0  # stage 1 adds the fine level's error
    # one level: the DFM validation is plain flow matching's, number for number
    cache = load_latent_cache(cfg.data["cache"])
    torch.manual_seed(0)
    from helpers.builders import nano, perturb_
    from snapgen.models import ThreeStageDiT
    from snapgen.text import TextConditioning

    model = perturb_(ThreeStageDiT(nano()))
    cond = TextConditioning(encoder_dims=[32], out_dim=32)
    plain = validation_loss(model, cond, cache, objective=FlowMatchingLoss(), per_sample=True)
    (one,) = dfm_validation_losses(model, cond, cache, objective=DecomposableFlowLoss(levels=1))
    assert torch.equal(plain, one) and plain.mean() > 0


def test_dfm_fine_tuning_warm_starts_from_a_plain_pipeline(tmp_path):
    from helpers.builders import nano, perturb_

    from snapgen.models import ThreeStageDiT
    from snapgen.models.multiscale import to_dfm
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.vae import Autoencoder, AutoencoderConfig

    torch.manual_seed(3)
    plain = perturb_(ThreeStageDiT(nano()))
    cond_kw = {"encoder_dims": [32], "out_dim": 32, "drop_probs": [0.0], "null_length": 1}
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    TextToImagePipeline(plain, TextConditioning(**cond_kw), vae, PipelineConfig(conditioning=cond_kw)
                        ).save_pretrained(tmp_path / "src", dtype=torch.float32)
    cfg = dfm_run(tmp_path, "ft", 2)
    cfg.model["init_from"] = str(tmp_path / "src")
    trainer = Trainer(cfg, progress=False)
    want = to_dfm(plain, 2).state_dict()
    got = trainer.task.model.state_dict()
    assert set(want) == set(got), set(want) ^ set(got)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]  # the converted model, the coarse level included
    trainer.fit()
    assert len(losses(tmp_path / "ft")) == 2


def test_an_elastic_dfm_supernetwork_trains_every_width(tmp_path):
    cfg = flow_config(tmp_path, "el", 4, model={"preset": "nano-elastic", "dfm_levels": 2},
                      flow={"objective": "dfm", "stage_probs": [0.5, 0.5]})
    cfg["data"] = {"cache": str(learnable_cache(tmp_path / "patterns.safetensors"))}
    Trainer(TrainConfig.from_dict(cfg), progress=False).fit()
    recs = [r for r in records(tmp_path / "el") if "loss" in r]
    assert len(recs) == 4 and all("fm_full" in r and "loss_per_bin" in r for r in recs)
    assert any(k.startswith("kd_") for r in recs for k in r)  # a sub-network distilled from the full width
    saved = json.loads((tmp_path / "el" / "final" / "transformer" / "config.json").read_text())
    assert saved["dfm_levels"] == 2 and saved["elastic_variants"]
