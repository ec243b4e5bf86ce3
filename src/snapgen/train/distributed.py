"""torch.distributed for the trainer: process-group setup from torchrun's environment, and the DDP wrapper.

``torchrun --nproc-per-node N -m snapgen.cli train --config ...`` (or ``snapgen train`` under torchrun)
runs data-parallel: gloo on CPU, nccl on CUDA. Each rank computes its part of the global batch
(``batch_size x ranks x accumulation``; see ``snapgen.data.batches``); DDP averages the gradients; every rank
holds identical weights, EMA and optimizer state, so rank 0 alone writes checkpoints, metrics and exports,
and a run resumes at any world size (the checkpoint does not depend on it).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import env

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
        world = env.world_size()
        if world <= 1:
            return cls()
        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return cls(dist.get_rank(), dist.get_world_size(), env.local_rank(), backend)

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

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (a JSON-able value), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

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


# ------------------------------------------------------------------------------------------------------ FSDP2
def shard_modules(modules: dict[str, nn.Module], world: int, device_type: str) -> None:
    """FSDP2 (``fully_shard``): every transformer block is its own unit, then each trained module as a whole,
    so parameters, gradients and optimizer state live sharded over the ranks and one block is gathered at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..models.layers import DiTBlock

    mesh = init_device_mesh(device_type, (world,))
    for module in modules.values():
        for sub in module.modules():
            if isinstance(sub, DiTBlock):
                fully_shard(sub, mesh=mesh)
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a collective, so every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(optimizer, params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state keyed by parameter name (DTensors stay sharded), created empty if no step was taken yet."""
    out = {}
    for name, p in params.items():
        st = optimizer.state[p]
        if not st:  # materialise, so a checkpoint loads into it
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        out[name] = st
    return out


def save_dcp(path, params: dict, ema: dict, optimizer) -> None:
    """Sharded checkpoint with ``torch.distributed.checkpoint`` (each rank writes its shards)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": dict(params), "ema": dict(ema), "optim": optimizer_state(optimizer, params)},
             checkpoint_id=str(path))


def load_dcp(path, params: dict, ema: dict, optimizer) -> None:
    """Load a ``save_dcp`` checkpoint into the current (any world size, sharded or not) tensors."""
    import torch.distributed.checkpoint as dcp

    state = {"model": dict(params), "ema": dict(ema), "optim": optimizer_state(optimizer, params)}
    dcp.load(state, checkpoint_id=str(path))
    with torch.no_grad():  # DCP loads in place into the tensors given; make sure parameters got the values
        for k, p in params.items():
            if state["model"][k] is not p:
                p.copy_(state["model"][k])
        for k in ema:
            if state["ema"][k] is not ema[k]:
                ema[k].copy_(state["ema"][k])
