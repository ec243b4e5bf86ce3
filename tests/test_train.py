"""Trainer: exact resume after SIGKILL, divergence handling, checkpoints, schedules, EMA, batches."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import flow_config, losses, write_config

from snapgen.train import Trainer, TrainingDiverged, load_config, lr_at
from snapgen.train.checkpoint import list_checkpoints
from snapgen.train.config import TrainConfig
from snapgen.data.batches import batch_indices

REPO = Path(__file__).resolve().parents[1]


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "snapgen.cli", "train", "--config", str(config), "--no-progress"]


def test_exact_resume_after_sigkill(tmp_path):
    steps = 60
    ref_cfg = write_config(tmp_path, flow_config(tmp_path, "ref", steps), "ref")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    subprocess.run(_cli(ref_cfg), check=True, env=env, capture_output=True, timeout=600)

    cfg = write_config(tmp_path, flow_config(tmp_path, "killed", steps), "killed")
    proc = subprocess.Popen(_cli(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpt_dir / "step_0000020").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(tmp_path / "killed"))
    assert killed_at < steps, "the kill must land mid-training"

    subprocess.run(_cli(cfg), check=True, env=env, capture_output=True, timeout=600)
    ref, resumed = losses(tmp_path / "ref"), losses(tmp_path / "killed")
    assert sorted(resumed) == sorted(ref) == list(range(1, steps + 1))
    assert resumed == ref  # bit-identical losses, including those after the resume point
    from safetensors.torch import load_file

    w_ref = load_file(str(tmp_path / "ref" / "final" / "transformer" / "model.safetensors"))
    w_res = load_file(str(tmp_path / "killed" / "final" / "transformer" / "model.safetensors"))
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_resume_in_process_matches_and_keeps_rng(tmp_path):
    full = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "full", 24)), progress=False)
    full.fit()
    part = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "part", 10)), progress=False)
    part.fit()
    # extend the same run to 24 steps (only `steps` changes)
    more = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "part", 24)), progress=False)
    more.fit()
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "nan", 40)), progress=False)
    real_loss = trainer.task.loss

    def poisoned(step):
        loss, logs = real_loss(step)
        return (loss * float("nan") if step == 25 else loss), logs

    trainer.task.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 25.*last good checkpoint"):
        trainer.fit()
    ckpts = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000010", "step_0000020"]
    # the kept checkpoint is finite and resumable
    again = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "nan", 40)), progress=False)
    again.task.prepare(again.run_dir)
    assert again.resume() and again.step == 20
    assert all(torch.isfinite(p).all() for p in again.params.values())


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    Trainer(TrainConfig.from_dict(flow_config(tmp_path, "c", 20)), progress=False).fit()
    latest = tmp_path / "c" / "checkpoints" / "step_0000020" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    t = Trainer(TrainConfig.from_dict(flow_config(tmp_path, "c", 20)), progress=False)
    t.task.prepare(t.run_dir)
    with pytest.warns(UserWarning, match="corrupt"):
        assert t.resume()
    assert t.step == 10


def test_changed_config_refuses_to_resume(tmp_path):
    Trainer(TrainConfig.from_dict(flow_config(tmp_path, "r", 5)), progress=False).fit()
    changed = flow_config(tmp_path, "r", 5, batch_size=4)
    with pytest.raises(ValueError, match=r"different config.*batch_size"):
        Trainer(TrainConfig.from_dict(changed), progress=False).fit()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"task": "flow", "stepz": 3})
    with pytest.raises(ValueError, match="task must be"):
        TrainConfig.from_dict({"task": "gan"})
    with pytest.raises(ValueError, match="unknown optim keys"):
        TrainConfig.from_dict({"task": "flow", "optim": {"learning_rate": 1}})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [flow\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    cfg = flow_config(tmp_path, "k", 3)
    cfg["data"]["bogus"] = 1
    with pytest.raises(ValueError, match="unknown keys in 'data'"):
        Trainer(TrainConfig.from_dict(cfg), progress=False)


def test_shipped_configs_parse():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        cfg = load_config(path)
        assert cfg.steps > 0, path


def test_lr_schedule():
    cfg = TrainConfig.from_dict({"task": "flow", "steps": 110, "optim": {"lr": 1.0, "warmup": 10,
                                                                         "schedule": "cosine", "min_lr_ratio": 0.1}})
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    vals = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    const = TrainConfig.from_dict({"task": "flow", "steps": 50, "optim": {"lr": 2.0, "warmup": 0}})
    assert {lr_at(s, const) for s in range(50)} == {2.0}


def test_ema_update_formula(tmp_path):
    cfg = flow_config(tmp_path, "ema", 1, ema_decay=0.9, ema_warmup=False)
    t = Trainer(TrainConfig.from_dict(cfg), progress=False)
    t.task.prepare(t.run_dir)
    before = {k: p.detach().clone() for k, p in t.params.items()}
    with torch.no_grad():
        for p in t.params.values():
            p.add_(1.0)
    t._update_ema()
    for k, p in t.params.items():
        torch.testing.assert_close(t.ema[k], 0.9 * before[k] + 0.1 * p.detach())


def test_batch_indices_cover_each_epoch_once():
    n, b = 37, 8
    seen = np.concatenate([batch_indices(0, s, n, b) for s in range(n)])  # n*b items = b epochs
    for e in range(b):
        assert sorted(seen[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert np.array_equal(batch_indices(0, 5, n, b), batch_indices(0, 5, n, b))
    assert not np.array_equal(batch_indices(0, 5, n, b), batch_indices(1, 5, n, b))


def test_loss_is_logged_per_time_bin(tmp_path):
    Trainer(TrainConfig.from_dict(flow_config(tmp_path, "bins", 10, log_every=5, time_bins=4)),
            progress=False).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "bins" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10]
    for r in recs:
        assert len(r["loss_per_bin"]) == 4
        finite = [v for v in r["loss_per_bin"] if v is not None]
        assert finite and all(math.isfinite(v) for v in finite)
    assert (tmp_path / "bins" / "loss.png").stat().st_size > 1000
