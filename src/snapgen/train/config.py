"""Training configuration: one YAML file per run (``configs/*.yaml``), validated up front.

Top-level keys are the fields of :class:`TrainConfig`; ``task`` picks what is trained (a name registered in
:data:`snapgen.tasks.TASKS`: ``autoencoder``, ``flow``, ``dmd``, ``kdmd``) and the task reads and validates
its own sections (``model``, ``data``, ``text``, ...). Unknown top-level keys are an error (a typo must not
silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "OptimConfig", "load_config"]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup: int = 100                 # linear warm-up steps
    schedule: str = "constant"        # "constant" or "cosine" (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0            # max grad norm of each parameter group (default); 0 disables
    clip_mode: str = "per_group"      # "per_group": each group by its own norm; "global": all by the joint norm
    # per parameter group of the task (e.g. generator / critic): {name: {lr | lr_scale, betas, weight_decay,
    # eps, clip}}; unset values are the ones above
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.clip_mode not in ("per_group", "global"):
            raise ValueError(f"optim.clip_mode must be 'per_group' or 'global', got {self.clip_mode!r}")


def task_names() -> list[str]:
    from ..tasks import task_names as names  # the registry (importing snapgen.tasks registers every task)

    return names()


@dataclass
class TrainConfig:
    task: str                                    # a registered task: "autoencoder" | "flow" | "dmd" | "kdmd"
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    device: str = "auto"                         # "auto" = cuda if available, else cpu
    # "fp32" | "bf16": bf16 autocast on CUDA only (fp32 on CPU); with strategy fsdp a MixedPrecisionPolicy
    # (bf16 compute, fp32 reduce and master weights) on any device: snapgen.train.distributed
    precision: str = "fp32"
    threads: int = 0                             # torch intra-op threads; 0 = torch default
    grad_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float = 0.999
    ema_warmup: bool = True                      # decay = min(ema_decay, (1 + step) / (10 + step))
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 500                      # 0 disables sample grids
    time_bins: int = 5                           # flow loss logged per equal-width time bin
    # task sections (free-form dicts, validated by the task)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)
    elastic: dict[str, Any] = field(default_factory=dict)      # elastic width training (flow task, elastic model)
    distill: dict[str, Any] = field(default_factory=dict)      # step distillation (tasks dmd / kdmd)
    kd: dict[str, Any] = field(default_factory=dict)           # knowledge distillation from a teacher (flow task)
    # {strategy: ddp | fsdp, accumulation: N, reshard_after_forward: auto | true | false (fsdp)} (torchrun)
    distributed: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    # read only by `snapgen plan`: sizes of models that are not on this machine, or the paper's models where
    # this implementation uses a stand-in (snapgen.train.plan_models); training ignores it
    plan: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.optim, dict):
            names = {f.name for f in dataclasses.fields(OptimConfig)}
            bad = sorted(set(self.optim) - names)
            if bad:
                raise ValueError(f"unknown optim keys {bad}; valid: {sorted(names)}")
            self.optim = OptimConfig(**self.optim)
        if self.task not in task_names():
            raise ValueError(f"task must be one of {', '.join(task_names())}, got {self.task!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown config keys {bad}; valid top-level keys: {sorted(names)}")
        if "task" not in d:
            raise ValueError(f"config needs a 'task' key (one of {', '.join(task_names())})")
        return cls(**d)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path} (see configs/ for examples)")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a YAML mapping of config keys")
    d.update(overrides or {})
    return TrainConfig.from_dict(d)
