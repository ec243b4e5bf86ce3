"""Several text encoders past training: step distillation (DMD) of a two-encoder base reads both encoders' cached
features, and its distilled pipeline keeps both; the mobile (ExecuTorch) export of a two-encoder pipeline runs
like PyTorch. (The flow run, cache, pipeline folder and ONNX export: test_multi_encoder.py.)"""

import json

import pytest
import torch
from helpers.multi_encoder import DIMS, LENGTHS, PROMPTS, two_encoder_pipeline, two_encoder_run

from snapgen.data.batches import part_indices
from snapgen.data.latent_cache import cache_features
from snapgen.pipelines import TextToImagePipeline
from snapgen.tasks import build_task
from snapgen.train import Trainer
from snapgen.train.config import TrainConfig

EXECUTORCH_ATOL = 1e-2  # as tests/test_export_onnx.py: XNNPACK's kernels differ from PyTorch's in float rounding


def dmd_config(tmp_path, base, run, steps):
    return TrainConfig.from_dict({
        "task": "dmd", "run_dir": str(tmp_path / run), "seed": 1, "steps": steps, "batch_size": 4, "threads": 1,
        "model": {"init_from": str(base)}, "data": {"cache": str(tmp_path / "latents.safetensors"), "resolution": 16},
        "optim": {"lr": 1e-3, "betas": [0.0, 0.99], "weight_decay": 0.0, "warmup": 0, "schedule": "constant"},
        "distill": {"student_lora": {"rank": 2, "alpha": 4}, "critic_lora": {"rank": 2, "alpha": 4}, "gen_every": 2,
                    "teacher_guidance": 2.0, "variants": ["full"]},
        "log_every": 1, "ckpt_every": 2, "sample_every": 0})


def test_dmd_of_a_two_encoder_base(tmp_path, berts, vae_dir):
    Trainer(two_encoder_run(tmp_path, berts, vae_dir, "base", 2), progress=False).fit()
    base = tmp_path / "base" / "final"
    task = build_task(dmd_config(tmp_path, base, "probe", 2), torch.device("cpu"))
    task.prepare(tmp_path / "probe")
    assert len(task.text_features) == 2 and [t.shape[2] for t, _ in task.text_features] == list(DIMS)
    # the generator's condition is both encoders' tokens, concatenated: exactly the conditioning of the cached rows
    cond, uncond, _ = task._condition(0)
    assert cond["text"].shape[1] == sum(LENGTHS) and uncond["text"].shape[1] == sum(LENGTHS)
    rows = task.caption_index[torch.from_numpy(part_indices(1, 0, len(task.caption_index), 4, 0, task.parts))]
    feats = cache_features(task.text_features, rows)
    with torch.no_grad():
        ref, ref_mask = task.conditioning(feats, drop=[torch.zeros(4, dtype=torch.bool)] * 2)
    assert torch.equal(cond["text"], ref) and torch.equal(cond["text_mask"], ref_mask)
    # encoder 2's cached features reach the condition (and only its part of it)
    task.text_features[1] = (task.text_features[1][0] + 1.0, task.text_features[1][1])
    moved, _, _ = task._condition(0)
    L0 = LENGTHS[0]
    assert torch.equal(moved["text"][:, :L0], cond["text"][:, :L0])
    assert (moved["text"][:, L0:] - cond["text"][:, L0:]).abs().max() > 1e-3

    Trainer(dmd_config(tmp_path, base, "dmd", 2), progress=False).fit()
    final = tmp_path / "dmd" / "final"
    meta = json.loads((final / "pipeline.json").read_text())
    assert meta["text_encoder"] == berts and meta["text_max_length"] == LENGTHS and meta["sampler"] == "few_step"
    pipe = TextToImagePipeline.from_pretrained(final)
    assert pipe.distilled and [e.dim for e in pipe.text_encoders] == list(DIMS)
    few = pipe(PROMPTS, seed=0, return_latents=True)
    pipe.use_base()
    assert (few - pipe(PROMPTS, seed=0, return_latents=True)).abs().max() > 1e-3  # the adapter is on in few-step


@pytest.mark.export
@pytest.mark.slow  # three graphs lowered to XNNPACK (~1 min on 2 cores); the ONNX twin runs in CI
def test_two_encoder_executorch_export_matches_pytorch(berts, tmp_path):
    pytest.importorskip("executorch")
    from snapgen.export.mobile import ExecuTorchPipeline, export_executorch

    pipe = two_encoder_pipeline(berts)
    out = export_executorch(pipe, tmp_path / "et", progress=False)
    meta = json.loads((out / "export.json").read_text())
    assert meta["text_encoders"] == 2 and meta["text_max_length"] == LENGTHS
    et = ExecuTorchPipeline(out)
    tokens, mask = et.encode(PROMPTS[0])
    assert tokens.shape[1] == sum(LENGTHS) and mask[0, LENGTHS[0]:].any()
    a = et(PROMPTS[:1], seed=4, return_latents=True)
    b = pipe(PROMPTS[:1], seed=4, return_latents=True)
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, atol=EXECUTORCH_ATOL, rtol=0)
