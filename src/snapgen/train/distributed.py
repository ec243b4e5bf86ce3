"""torch.distributed for the trainer: process-group setup from torchrun's environment, the ``distributed:``
config section, the DDP wrapper, and FSDP2 (``fully_shard`` with a ``MixedPrecisionPolicy``, the
``reshard_after_forward`` choice, sharded checkpoints through ``torch.distributed.checkpoint``).

``torchrun --nproc-per-node N -m snapgen.cli train --config ...`` (or ``snapgen train`` under torchrun)
runs data-parallel: gloo on CPU, nccl on CUDA. Each rank computes its part of the global batch
(``batch_size x ranks x accumulation``; see ``snapgen.data.batches``); DDP averages the gradients; every rank
holds identical weights, EMA and optimizer state, so rank 0 alone writes checkpoints, metrics and exports,
and a run resumes at any world size (the checkpoint does not depend on it). With ``strategy: fsdp`` weights,
gradients and AdamW state are sharded instead, and every rank writes its shards (docs/distributed.md).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import env

__all__ = ["DistributedContext", "LossModule", "read_settings", "mixed_precision_policy", "reshard_after_forward",
           "shard_modules", "save_dcp", "load_dcp"]


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


def read_settings(section: dict, task: str, supported, enabled: bool) -> tuple[str, int, object]:
    """The config's ``distributed:`` section checked: ``(strategy, accumulation, reshard_after_forward)``;
    the strategy is ``single`` without torchrun (one process)."""
    unknown = sorted(set(section) - {"strategy", "accumulation", "reshard_after_forward"})
    if unknown:
        raise ValueError(f"unknown keys in 'distributed': {unknown}; "
                         f"valid: ['accumulation', 'reshard_after_forward', 'strategy']")
    strategy = section.get("strategy", "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"distributed.strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if enabled and strategy not in supported:
        raise ValueError(f"task {task!r} supports distributed.strategy {' or '.join(supported)}, not {strategy!r}")
    accumulation = int(section.get("accumulation", 1))
    if accumulation < 1:
        raise ValueError(f"distributed.accumulation must be >= 1, got {accumulation}")
    reshard = section.get("reshard_after_forward", "auto")
    reshard_after_forward(reshard)  # checked now, also in a single process (a typo must not wait for torchrun)
    return (strategy if enabled else "single"), accumulation, reshard


# ------------------------------------------------------------------------------------------------------ FSDP2
RESHARD_CHOICES = ("auto", True, False)


def mixed_precision_policy(precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for the run's ``precision`` (the trainer's FSDP path; DDP and single
    processes use ``torch.autocast`` on CUDA instead).

    ``bf16``: parameters are all-gathered and computed in bf16 (``param_dtype``), gradients reduce-scattered in
    fp32 (``reduce_dtype``) into the fp32 sharded master parameters that AdamW updates; inputs of every FSDP
    unit are cast to bf16, the outputs of the trained modules (the roots) back to fp32 (``output_dtype`` is set
    by :func:`shard_modules`) so losses are computed in fp32. This is applied on every device, CPU included
    (gloo all-gathers and reduce-scatters bf16; the CPU computes bf16 slowly but exactly as a GPU would round).
    ``fp32``: the same policy object with fp32 everywhere (no casts: identical to plain FSDP)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def reshard_after_forward(setting="auto", widths_per_step: int = 1) -> tuple[bool, bool]:
    """``(root, blocks)``: FSDP2's ``reshard_after_forward`` for the trained modules (the roots) and for their
    transformer blocks, from ``distributed.reshard_after_forward`` (``auto`` | ``true`` | ``false``).

    Resharding after forward frees a unit's gathered parameters when its forward ends and all-gathers them
    again for its backward: memory of one gathered block at a time, at the price of one more all-gather per
    block and forward. ``auto`` (the default):

    - roots: False. Their own parameters (embedders, final layer) are needed again as soon as backward
      starts, and they are small (FSDP2's own default for roots).
    - blocks: True (one block gathered at a time), unless the task runs several widths of an elastic
      supernetwork per step (``task.widths_per_step > 1``: the sandwich rule runs full + smallest + random
      widths, each a forward through every block). Then resharding would all-gather every block once per
      width in forward and again in backward; keeping them gathered costs one all-gather per block and step
      (backward still re-gathers a block resharded by an earlier width's backward). The memory cost: every
      block's parameters stay gathered, in ``param_dtype`` (bf16: 2 bytes per parameter, the whole
      transformer on every rank, e.g. ~1.6 GB for a 0.8B-parameter model) from the first forward until the
      block's backward; gradients and AdamW state stay sharded.

    ``true`` reshards every unit (roots too: least memory); ``false`` keeps every unit gathered (least
    communication)."""
    if setting not in RESHARD_CHOICES:
        raise ValueError(f"distributed.reshard_after_forward must be auto, true or false, got {setting!r}")
    if setting == "auto":
        return False, widths_per_step <= 1
    return bool(setting), bool(setting)


def _dtype_name(dtype) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")  # None: the parameters' own dtype, fp32 here


def shard_modules(modules: dict[str, nn.Module], world: int, device_type: str, mp_policy=None,
                  reshard: tuple[bool, bool] = (False, True)) -> dict:
    """FSDP2 (``fully_shard``): every transformer block is its own unit, then each trained module as a whole,
    so parameters, gradients and optimizer state live sharded over the ranks and one block is gathered at a time.
    ``mp_policy``: :func:`mixed_precision_policy` (None: fp32); ``reshard``: :func:`reshard_after_forward`.
    Returns the settings applied (for the log and ``env.json``)."""
    import dataclasses

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models.layers import DiTBlock

    mp_policy = mp_policy or MixedPrecisionPolicy()
    root_policy = dataclasses.replace(mp_policy, output_dtype=torch.float32) if mp_policy.param_dtype else mp_policy
    mesh = init_device_mesh(device_type, (world,))
    for module in modules.values():
        for sub in module.modules():
            if isinstance(sub, DiTBlock):
                fully_shard(sub, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard[1])
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh, mp_policy=root_policy, reshard_after_forward=reshard[0])
    return {"param_dtype": _dtype_name(mp_policy.param_dtype), "reduce_dtype": _dtype_name(mp_policy.reduce_dtype),
            "reshard_after_forward": {"roots": reshard[0], "blocks": reshard[1]}}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a collective, so every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _materialise(optimizer) -> None:
    """Give every parameter AdamW's initial state (step 0, zero moments) where it has none yet: exactly the
    state AdamW creates at a parameter's first gradient, so training is unchanged, and every checkpoint holds
    every parameter's state (DCP loads into an existing structure). ``get_optimizer_state_dict`` would
    instead take a zero-gradient step, leaving ``step`` at 1, which changes the bias correction."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_state(modules: dict[str, nn.Module], optimizer) -> dict:
    """``get_optimizer_state_dict`` of the trained modules (FQNs ``<module>.<param>``: the keys of the trainer's
    ``params``; DTensor states stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _materialise(optimizer)
    return get_optimizer_state_dict(nn.ModuleDict(modules), optimizer)


def save_dcp(path, modules: dict[str, nn.Module], params: dict, ema: dict, optimizer) -> None:
    """Sharded checkpoint with ``torch.distributed.checkpoint`` (each rank writes its shards): ``model`` (the
    trained parameters by name), ``ema`` and ``optim``, the tensor state of ``get_optimizer_state_dict`` (by
    parameter name; the param groups are JSON in ``optimizer.json`` beside it). The layout equals the one the
    hand-named state of earlier snapgen versions wrote, so their checkpoints load too."""
    import torch.distributed.checkpoint as dcp

    optim = _optimizer_state(modules, optimizer)
    dcp.save({"model": dict(params), "ema": dict(ema), "optim": optim["state"]}, checkpoint_id=str(path))


def _reason(e: Exception) -> str:
    """One line per failing rank of a DCP error (``CheckpointException.failures`` holds (exception, traceback))."""
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {e}"
    errors = {r: f[0] if isinstance(f, tuple) else f for r, f in failures.items()}
    return "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(errors.items()))


def load_dcp(path, modules: dict[str, nn.Module], params: dict, ema: dict, optimizer) -> None:
    """Load a ``save_dcp`` checkpoint into the current (any world size, sharded or not) tensors; the optimizer
    through ``set_optimizer_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    optim = _optimizer_state(modules, optimizer)
    state = {"model": dict(params), "ema": dict(ema), "optim": optim["state"]}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) names the keys
        raise ValueError(f"the sharded checkpoint {path} does not fit this run's model and optimizer "
                         f"({_reason(e)}). It was "
                         f"written by another model or an incompatible snapgen; start a new run_dir (its last "
                         f"export can be the new run's model.init_from)") from None
    with torch.no_grad():  # DCP loads in place into the tensors given; make sure parameters got the values
        for k, p in params.items():
            if state["model"][k] is not p:
                p.copy_(state["model"][k])
        for k in ema:
            if state["ema"][k] is not ema[k]:
                ema[k].copy_(state["ema"][k])
    set_optimizer_state_dict(nn.ModuleDict(modules), optimizer, {**optim, "state": state["optim"]})
