"""Distillation runs from an external diffusers teacher (a tiny random SD3 with its own CLIP text encoders)
through the real config path: flow KD via ``snapgen distill kd``, DMD's real score and K-DMD's few-step
teacher via the trainer. The teacher stays frozen, and its outputs reach the student's gradient."""

import json
import math

import pytest
import torch
from helpers.builders import perturb_
from helpers.runs import distill_config, flow_config, write_config
from helpers.teachers import save_tiny_sd3

from snapgen.train import Trainer
from snapgen.train.config import TrainConfig


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = save_tiny_sd3(tmp_path_factory.mktemp("sd3"))
    return {"kind": "diffusers", "path": str(folder), "max_sequence_length": 8}


def _step_grads(task, params, step=0):
    for p in params:
        p.grad = None
    loss, _ = task.loss(step)
    loss.backward()
    return [p.grad.clone() for p in params], float(loss.detach())


def _teacher_effect(task, teacher, params, step=0):
    """Student gradients of one step with the teacher, then with a perturbed teacher: they must differ (the
    teacher's outputs are in the student's loss) while the teacher gets no gradient."""
    before, loss = _step_grads(task, params, step)
    assert math.isfinite(loss) and any(g.abs().max() > 0 for g in before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        perturb_(teacher.transformer, std=0.2, seed=5)
    after, _ = _step_grads(task, params, step)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    assert diff > 1e-6, "the student's gradient does not depend on the teacher"
    assert all(p.grad is None for p in teacher.parameters())


def test_flow_kd_from_an_external_sd3_teacher(tmp_path, sd3):
    from snapgen.cli import main

    cfg = flow_config(tmp_path, "kd", 3, kd={"teacher": sd3}, log_every=1, ckpt_every=3)
    assert main(["distill", "kd", "--config", str(write_config(tmp_path, cfg, "kd")), "--no-progress"]) == 0
    recs = [json.loads(ln) for ln in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in recs if "kd_out_full" in r]
    assert len(losses) == 3
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in losses for k in ("kd_out_full", "kd_feat_full", "task_full"))

    trainer = Trainer(TrainConfig.from_dict({**cfg, "run_dir": str(tmp_path / "grad")}), progress=False)
    task = trainer.task
    task.prepare(tmp_path / "grad")
    assert task.kd_teacher.feature_width == 16 and task.kd.projectors["full"].out_features == 16
    assert task.kd_teacher._pipe is None and len(task.kd_teacher._rows) == len(task.captions) + 1  # + negative
    assert not any(n.startswith("kd_projectors") and "transformer" in n for n in trainer.params)
    _teacher_effect(task, task.kd_teacher, list(task.model.parameters()))
    # a caption dropped for the student (CFG dropout) is the teacher's negative prompt
    seen, condition = [], task.kd_teacher.condition
    task.kd_teacher.condition = lambda *a, **k: seen.append(condition(*a, **k)) or seen[-1]
    task.conditioning.drop_probs = [1.0]
    task.loss(1)
    null = task.kd_teacher.null_condition(8, seen[0])
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], null["encoder_hidden_states"], atol=0, rtol=0)
    torch.testing.assert_close(seen[0]["pooled_projections"], null["pooled_projections"], atol=0, rtol=0)


def test_dmd_real_score_from_an_external_teacher(tmp_path, base, sd3):
    """``distill.teacher``: the DMD term's real score is the external teacher with CFG (its negative prompt as
    the unconditional branch); the student's LoRA gradient changes with the teacher."""
    cfg = distill_config(tmp_path, base, "dmd", "dmd", 2, variants=["tiny"], teacher=sd3)
    trainer = Trainer(cfg, progress=False)
    task = trainer.task
    assert task.teacher is task.ext_teacher and task.teacher.latent_channels == task.base.config.in_channels
    task.prepare(tmp_path / "dmd")
    cond, uncond, extra = task._condition(0)
    assert set(extra) == {"teacher_cond", "teacher_uncond"}
    shapes = {k: extra[k]["encoder_hidden_states"].shape for k in extra}
    assert shapes["teacher_cond"] == shapes["teacher_uncond"]
    student = [p for n, p in task.base.named_parameters() if ".lora.dmd_tiny." in n]
    assert student and task.losses["tiny"].is_generator_step(0)
    _teacher_effect(task, task.teacher, student)
    trainer.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss_critic_tiny"]) for r in recs if "loss_critic_tiny" in r)
    assert any(math.isfinite(r.get("loss_dmd_tiny", math.nan)) for r in recs)


def test_kdmd_with_an_external_real_and_few_step_teacher(tmp_path, base, sd3):
    """K-DMD with both teachers external: the knowledge terms read the few-step teacher's velocity and last-block
    tokens (projected to its width, 16, on the student's token grid); the run exports its adapters."""
    cfg = distill_config(tmp_path, base, "kdmd", "kdmd", 2, variants=["tiny"], teacher=sd3,
                         few_step_teacher={**sd3, "feature_tap": "transformer_blocks.0"})
    trainer = Trainer(cfg, progress=False)
    task = trainer.task
    assert task.projectors["tiny"].out_features == 16 and task.few_step is task.ext_few_step
    trainer.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "kdmd" / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in recs if "loss_out_tiny" in r]
    assert gen and all(math.isfinite(r[k]) for r in gen for k in ("loss_dmd_tiny", "loss_out_tiny", "loss_feat_tiny"))
    assert (tmp_path / "kdmd" / "final" / "adapters" / "kdmd_tiny.safetensors").is_file()
    # the few-step teacher's outputs reach the student (knowledge terms only: no DMD term)
    cfg = distill_config(tmp_path, base, "kdmd", "grad", 2, variants=["tiny"], teacher=sd3, few_step_teacher=sd3,
                         weights={"dmd": 0.0})
    task = Trainer(cfg, progress=False).task
    task.prepare(tmp_path / "grad")
    student = [p for n, p in task.base.named_parameters() if ".lora.kdmd_tiny." in n]
    _teacher_effect(task, task.ext_few_step, student)
