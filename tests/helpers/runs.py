"""Training runs in tests: a tiny latent cache, flow-task configs, a run's losses and last weights,
torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from snapgen.data.latent_cache import save_latent_cache


def make_cache(path: Path, n: int = 48, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    U, L, D = 7, 5, 32  # nano text_dim
    tokens = torch.randn(U, L, D, generator=g)
    mask = torch.ones(U, L, dtype=torch.bool)
    mask[::2, 3:] = False
    tokens[~mask] = 0
    idx = torch.randint(0, U, (n,), generator=g)
    return save_latent_cache(path, latents, idx, tokens, mask, [f"caption {i}" for i in range(U)])


def feature_encoder(tmp_path: Path, dim: int = 32) -> str:
    """A text-encoder folder for runs on cached caption features: the flow task reads only its width from
    config.json (training reads the features from the latent cache; no weights are ever loaded)."""
    d = tmp_path / "text_encoder"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"hidden_size": dim}))
    return str(d)


def flow_config(tmp_path: Path, run: str, steps: int, **extra) -> dict:
    cfg = {
        "task": "flow", "run_dir": str(tmp_path / run), "seed": 3, "steps": steps, "batch_size": 8,
        "threads": 1, "model": {"preset": "nano"}, "text": {"encoder": feature_encoder(tmp_path), "drop_prob": 0.2},
        "data": {"cache": str(make_cache(tmp_path / "latents.safetensors"))},
        "optim": {"lr": 1e-3, "warmup": 5, "schedule": "constant"},
        "log_every": 1, "ckpt_every": 10, "sample_every": 0, "keep_checkpoints": 3,
    }
    cfg.update(extra)
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in recs}


def torchrun(cfg_path: Path, nproc: int = 2, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "snapgen.train", "--config", str(cfg_path), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def weights(run_dir: Path) -> dict:
    from snapgen.train.checkpoint import list_checkpoints

    last = list_checkpoints(run_dir / "checkpoints")[-1]
    return load_file(str(last / "model.safetensors"))


def distill_config(tmp_path, base, task, run, steps, seed=1, **distill):
    """A dmd / kdmd run on the ``distill_base`` pipeline folder (conftest's ``base`` fixture)."""
    from snapgen.train.config import TrainConfig

    return TrainConfig.from_dict({
        "task": task, "run_dir": str(tmp_path / run), "seed": seed, "steps": steps, "batch_size": 4, "threads": 1,
        "model": {"init_from": str(base)}, "data": {"cache": str(base / "cache.safetensors"), "resolution": 16},
        "optim": {"lr": 1e-3, "betas": [0.0, 0.99], "weight_decay": 0.0, "warmup": 0, "schedule": "constant",
                  "grad_clip": 10.0},
        "distill": {"student_lora": {"rank": 2, "alpha": 4}, "critic_lora": {"rank": 2, "alpha": 4},
                    "gen_every": 2, "teacher_guidance": 2.0, **distill},
        "log_every": 1, "ckpt_every": 2, "sample_every": 0})
