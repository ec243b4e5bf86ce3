"""The dmd / kdmd trainer tasks on a tiny elastic pipeline: a few-step LoRA teacher, K-DMD students for two
widths in one run, exact resume, and the exported distilled pipeline (adapters per variant, base mode)."""

import json

import pytest
import torch
from helpers.fakes import FakeEncoder
from helpers.runs import distill_config, losses

from snapgen.pipelines import TextToImagePipeline
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig


class Encoder32(FakeEncoder):
    dim = 32


def test_dmd_then_kdmd_for_two_widths_and_the_distilled_pipeline(tmp_path, base):
    Trainer(distill_config(tmp_path, base, "dmd", "dmd", 4, variants=["full"]), progress=False).fit()
    fewstep = tmp_path / "dmd" / "final"
    assert (fewstep / "adapters" / "dmd_full.safetensors").is_file()
    meta = json.loads((fewstep / "pipeline.json").read_text())
    assert meta["adapters"] == {"full": "dmd_full"} and meta["sampler"] == "few_step" and meta["guidance"] == 1.0
    assert meta["few_step_times"] == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])

    cfg = distill_config(tmp_path, base, "kdmd", "kdmd", 4, variants=["tiny", "small"],
                         few_step_teacher=str(fewstep))
    trainer = Trainer(cfg, progress=False)
    # trainable: the students' LoRAs, the critics' LoRAs and the projectors -- never the base weights
    names = list(trainer.params)
    assert names and all(".lora.kdmd_" in n or ".lora.critic." in n or n.startswith("projectors.") for n in names)
    trainer.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "kdmd" / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in recs if "loss_dmd_tiny" in r]
    assert gen and all({"loss_out_small", "loss_feat_small", "loss_critic_tiny"} <= set(r) for r in gen)

    pipe = TextToImagePipeline.from_pretrained(tmp_path / "kdmd" / "final", text_encoder=Encoder32())
    assert pipe.distilled and pipe.variant == "small"  # the widest width with an adapter
    few = [pipe.set_variant(v)(["a red circle"], seed=0, return_latents=True) for v in ("tiny", "small")]
    assert (few[0] - few[1]).abs().max() > 1e-3
    pipe.use_base()
    assert pipe.sampling_settings() == {"sampler": "euler", "steps": 6, "guidance": 3.0, "shift": 1.0}
    base_out = pipe(["a red circle"], seed=0, return_latents=True)
    ref = TextToImagePipeline.from_pretrained(base, text_encoder=Encoder32(), variant="small")(
        ["a red circle"], seed=0, return_latents=True)
    torch.testing.assert_close(base_out, ref, atol=1e-3, rtol=0)  # adapters off = the base model (fp16 file)
    with pytest.raises(ValueError, match="few-step adapters for"):
        pipe.use_base(False).set_variant("full")


def test_kdmd_resume_is_exact(tmp_path, base):
    Trainer(distill_config(tmp_path, base, "dmd", "dmd", 2, variants=["full"]), progress=False).fit()
    fs = str(tmp_path / "dmd" / "final")
    Trainer(distill_config(tmp_path, base, "kdmd", "whole", 6, variants=["tiny"], few_step_teacher=fs),
            progress=False).fit()
    Trainer(distill_config(tmp_path, base, "kdmd", "split", 3, variants=["tiny"], few_step_teacher=fs),
            progress=False).fit()
    Trainer(distill_config(tmp_path, base, "kdmd", "split", 6, variants=["tiny"], few_step_teacher=fs),
            progress=False).fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_distill_config_errors(tmp_path, base):
    with pytest.raises(ValueError, match="few_step_teacher"):
        Trainer(distill_config(tmp_path, base, "kdmd", "x", 2, variants=["tiny"]), progress=False)
    with pytest.raises(ValueError, match="not served"):
        Trainer(distill_config(tmp_path, base, "dmd", "y", 2, variants=["huge"]), progress=False)
    with pytest.raises(ValueError, match="unknown keys in 'distill'"):
        Trainer(distill_config(tmp_path, base, "dmd", "z", 2, variants=["full"], gen_evry=3), progress=False)


@pytest.mark.export
def test_distilled_variant_exports_to_onnx_with_its_adapter_merged(tmp_path, base):
    pytest.importorskip("onnxruntime")
    from snapgen.export.onnx import OnnxPipeline, export_onnx

    Trainer(distill_config(tmp_path, base, "dmd", "dmd", 2, variants=["tiny", "full"]), progress=False).fit()
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "dmd" / "final", variant="tiny")
    # make the adapter matter: a trained-looking (non-zero) update
    from snapgen.nn.lora import lora_parameters

    with torch.no_grad():
        for p in lora_parameters(pipe.transformer, "dmd_tiny").values():
            p.normal_(0, 0.05)
    export_onnx(pipe, tmp_path / "onnx", progress=False)
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["sampler"] == "few_step" and meta["batch"] == 1 and meta["mode"] == "distilled"
    a = OnnxPipeline(tmp_path / "onnx")(["a red circle"], seed=4, return_latents=True)
    b = pipe(["a red circle"], seed=4, return_latents=True)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    from snapgen.nn.lora import set_adapter

    set_adapter(pipe.transformer, None)  # same sampler without the adapter: differs, so it was merged
    assert (pipe(["a red circle"], seed=4, return_latents=True) - a).abs().max() > 1e-3


def test_extract_of_a_distilled_pipeline_merges_its_adapter(tmp_path, base):
    """``extract`` / ``snapgen extract`` on a distilled supernetwork: a plain standalone folder per width that
    generates what the distilled pipeline generates at that width (adapter merged, few-step sampler); after
    ``use_base()``, the base model with the base sampler."""
    from snapgen.nn.lora import lora_parameters

    Trainer(distill_config(tmp_path, base, "dmd", "dmd", 2, variants=["tiny", "full"]), progress=False).fit()
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "dmd" / "final", text_encoder=Encoder32())
    with torch.no_grad():  # trained-looking adapters, so merging matters
        for name in ("dmd_tiny", "dmd_full"):
            for p in lora_parameters(pipe.transformer, name).values():
                p.normal_(0, 0.05)
    for v in ("tiny", "full"):
        pipe.set_variant(v)
        sub = pipe.extract(v)
        assert not sub.distilled and sub.sampling_settings()["sampler"] == "few_step"
        sub.save_pretrained(tmp_path / f"sub_{v}")
        loaded = TextToImagePipeline.from_pretrained(tmp_path / f"sub_{v}", text_encoder=Encoder32())
        want = pipe(["a red circle"], seed=2, return_latents=True)
        torch.testing.assert_close(loaded(["a red circle"], seed=2, return_latents=True), want, atol=1e-5, rtol=0)
        assert pipe.transformer.variant == v and pipe(["a red circle"], seed=2, return_latents=True).equal(want)
    with pytest.raises(ValueError, match="few-step adapters for"):
        pipe.extract("small")
    pipe.use_base().set_variant("small")
    base_sub = pipe.extract("small")
    assert base_sub.sampling_settings() == {"sampler": "euler", "steps": 6, "guidance": 3.0, "shift": 1.0}
    torch.testing.assert_close(base_sub(["a red circle"], seed=2, return_latents=True),
                               pipe(["a red circle"], seed=2, return_latents=True), atol=1e-5, rtol=0)


def test_sample_grid_for_a_run_without_the_full_width(tmp_path, base):
    """Regression: the periodic sample grid of a run distilling only narrow widths (plain DMD students) must not
    switch the pipeline to a width without an adapter (it crashed dmd_students.yaml at its first grid)."""
    cfg = distill_config(tmp_path, base, "dmd", "narrow", 2, variants=["tiny"])
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "sampling": {"prompts": ["a red circle"]}})
    trainer = Trainer(cfg, progress=False)
    trainer.task.sample(tmp_path / "grid.png", 1)
    assert (tmp_path / "grid.png").is_file()
    assert trainer.task.base.variant == "full"


def test_combine_adapters_from_two_runs(tmp_path, base, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from snapgen.cli import main
    from snapgen.distill.combine import combine_adapters, parse_source

    Trainer(distill_config(tmp_path, base, "dmd", "a", 2, variants=["tiny", "full"], adapter_prefix="a"),
            progress=False).fit()
    Trainer(distill_config(tmp_path, base, "dmd", "b", 2, variants=["full"], adapter_prefix="b", seed=3),
            progress=False).fit()
    a, b = tmp_path / "a" / "final", tmp_path / "b" / "final"
    assert parse_source(f"{a}:tiny, small") == (a, ["tiny", "small"]) and parse_source(str(a)) == (a, None)
    assert main(["combine-adapters", f"{a}:tiny", str(b), "--out", str(tmp_path / "ab")]) == 0
    assert "'tiny': 'a_tiny'" in capsys.readouterr().out
    ab = TextToImagePipeline.from_pretrained(tmp_path / "ab", text_encoder=Encoder32())
    assert ab.config.adapters == {"full": "b_full", "tiny": "a_tiny"}
    assert sorted(p.name for p in (tmp_path / "ab" / "adapters").iterdir()) == ["a_tiny.safetensors",
                                                                                "b_full.safetensors"]
    for v, src in (("tiny", a), ("full", b)):  # each variant generates exactly as in the run it came from
        ref = TextToImagePipeline.from_pretrained(src, text_encoder=Encoder32(), variant=v)
        torch.testing.assert_close(ab.set_variant(v)(["a red circle"], seed=0, return_latents=True),
                                   ref(["a red circle"], seed=0, return_latents=True), atol=0, rtol=0)
    # later sources win; "a" alone keeps its own full adapter
    assert combine_adapters([(b, None), (a, None)], tmp_path / "ba") and json.loads(
        (tmp_path / "ba" / "pipeline.json").read_text())["adapters"] == {"full": "a_full", "tiny": "a_tiny"}

    with pytest.raises(ValueError, match="not a distilled pipeline"):
        combine_adapters([(base, None), (a, None)], tmp_path / "x")
    with pytest.raises(ValueError, match="no adapter for variant 'small'"):
        combine_adapters([(a, ["small"])], tmp_path / "x")
    other = tmp_path / "other"
    shutil.copytree(b, other)
    state = load_file(str(other / "transformer" / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(other / "transformer" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="same base model"):
        combine_adapters([(a, ["tiny"]), (other, None)], tmp_path / "x")
    Trainer(distill_config(tmp_path, base, "dmd", "c", 2, variants=["full"], adapter_prefix="b", seed=5),
            progress=False).fit()
    with pytest.raises(ValueError, match="two different adapters are named 'b_full'"):
        combine_adapters([(b, None), (tmp_path / "c" / "final", None)], tmp_path / "x")
    assert not (tmp_path / "x").exists()
