"""torch.distributed for the trainer: process-group setup from torchrun's environment, and the DDP wrapper.

``torchrun --nproc-per-node N -m snapgen.cli train --config ...`` (or ``snapgen train`` under torchrun)
runs data-parallel: gloo on CPU, nccl on CUDA. Each rank computes its part of the global batch
(``batch_size x ranks x accumulation``; see ``FlowTask.loss``); DDP averages the gradients; every rank
holds identical weights, EMA and optimizer state, so rank 0 alone writes checkpoints, metrics and exports,
and a run resumes at any world size (the checkpoint does not depend on it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "LossModule"]


@dataclass
class DistributedContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistributedContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """Average a Python float over ranks (for logging)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)


class LossModule(nn.Module):
    """One forward per iteration for DDP: the task's loss on one part of the global batch. The task's
    trainable modules are registered here so DDP finds their parameters; the task calls them as usual
    inside (elastic training runs the model several times per loss, which DDP sees as one forward)."""

    def __init__(self, task, modules: dict[str, nn.Module]):
        super().__init__()
        self.task = task
        self.trained = nn.ModuleDict(modules)

    def forward(self, step: int, part: int):
        return self.task.loss(step, part)
