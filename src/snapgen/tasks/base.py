"""The Task protocol: what the trainer needs from anything it trains.

A task owns its modules, data and loss; :class:`snapgen.train.Trainer` owns the loop (optimizer, clipping,
EMA, checkpoints, torchrun). A task declares

* ``modules()`` -> ``{name: (module, roles)}``, roles a subset of :data:`ROLES`: ``"trained"`` (its
  parameters with ``requires_grad`` go to the optimizer, DDP/FSDP and checkpoints), ``"ema"`` (the trainer
  keeps an exponential moving average, swapped in for samples and export), ``"exported"`` (part of what
  ``export`` writes). Critics and feature projectors are trained but neither averaged nor exported;
* ``param_groups()`` -> :class:`ParamGroup` s over those modules, each with its own lr (scale), betas, weight
  decay and gradient clip (``None`` = the run's ``optim`` value); ``optim.groups.<name>`` overrides them;
* ``loss(step, part)`` -> ``(loss, logs)`` for one part of the step's global batch (``part`` in
  ``0..parts-1``, ``parts = ranks x accumulation``: see :mod:`snapgen.data.batches`). With ``parts = 1``
  the trainer calls ``loss(step)``;
* ``prepare(run_dir)``, ``sample(path, step)``, ``export(out_dir)``, and for exact resume ``generator``
  (a ``torch.Generator`` checkpointed by the trainer, or None) and ``data_state()`` / ``load_data_state()``.

Tasks receive the run configuration duck-typed (:class:`RunConfig`; the trainer's ``TrainConfig`` is one):
this package sits below :mod:`snapgen.train` and never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["ROLES", "ParamGroup", "RunConfig", "Task", "check_keys", "module_roles", "param_groups", "StepGenerator"]

ROLES = frozenset({"trained", "ema", "exported"})
DEFAULT_ROLES = frozenset(ROLES)


class RunConfig(Protocol):
    """The fields of a run configuration that tasks read (``snapgen.train.TrainConfig`` provides them)."""

    task: str
    seed: int
    batch_size: int
    grad_checkpointing: bool
    time_bins: int
    model: dict[str, Any]
    data: dict[str, Any]
    text: dict[str, Any]
    vae: dict[str, Any]
    flow: dict[str, Any]
    elastic: dict[str, Any]
    distill: dict[str, Any]
    kd: dict[str, Any]
    loss: dict[str, Any]
    sampling: dict[str, Any]
    export: dict[str, Any]


@dataclass(frozen=True)
class ParamGroup:
    """Trained modules optimised with one set of settings; ``None`` fields take the run's ``optim`` value.
    ``lr`` is an absolute base learning rate, ``lr_scale`` a factor on ``optim.lr`` (give one of them); both
    follow the run's warm-up/schedule. ``clip``: max norm of this group's gradients (0 = no clipping)."""

    name: str
    modules: tuple[str, ...]
    lr: float | None = None
    lr_scale: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    clip: float | None = None

    SETTINGS = ("lr", "lr_scale", "betas", "weight_decay", "eps", "clip")

    def replace(self, **changes) -> "ParamGroup":
        bad = sorted(set(changes) - set(self.SETTINGS))
        if bad:
            raise ValueError(f"unknown keys in 'optim.groups.{self.name}': {bad}; valid: {sorted(self.SETTINGS)}")
        if "betas" in changes and changes["betas"] is not None:
            changes["betas"] = tuple(float(b) for b in changes["betas"])
        return ParamGroup(**{**self.__dict__, **changes})


def check_keys(section: str, d: dict, allowed: set[str]) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ValueError(f"unknown keys in '{section}': {bad}; valid: {sorted(allowed)}")


class StepGenerator:
    """Replays a task's generator for every part of a step: each part starts from the state the step started
    with and draws the *global* batch's random numbers (then uses its rows), so all parts, on any rank, see
    the numbers one process draws for the whole batch, and the generator ends every part in the state one
    process ends the step in. ``begin(step)`` before each part's draws."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self._step: int | None = None
        self._state: torch.Tensor | None = None

    def begin(self, step: int) -> torch.Generator:
        if self._step != step:
            self._step, self._state = step, self.generator.get_state()
        else:
            self.generator.set_state(self._state)
        return self.generator


class Task:
    """Base of the registered tasks: data-parallel bookkeeping and protocol defaults. Subclasses set ``name``
    and ``kind`` (by :func:`snapgen.tasks.register_task`) and implement ``modules``, ``loss``, ``export``."""

    name: str = ""
    kind: str = "train"                         # "train" | "distill"
    strategies: tuple[str, ...] = ("ddp", "fsdp")  # torchrun strategies the task supports
    widths_per_step: int = 1                    # forwards of the trained model per loss (elastic: several widths)
    generator: torch.Generator | None = None
    rank: int = 0
    world: int = 1
    parts: int = 1

    @classmethod
    def distill_method(cls, cfg: RunConfig) -> str | None:
        """The ``snapgen distill <method>`` this config runs (None: not a distillation run)."""
        return cfg.task if cls.kind == "distill" else None

    def set_data_parallel(self, rank: int, world: int, parts: int | None = None) -> None:
        """Called by the trainer before ``prepare``: this process is rank ``rank`` of ``world``, and a step's
        global batch has ``parts`` parts (ranks x accumulation)."""
        self.rank, self.world = rank, world
        if parts is not None:
            self.parts = parts

    def modules(self) -> dict[str, tuple[nn.Module, frozenset[str]]]:
        raise NotImplementedError

    def param_groups(self) -> list[ParamGroup]:
        """Default: one group over every trained module, with the run's settings."""
        names = tuple(n for n, (_, roles) in self.modules().items() if "trained" in roles)
        return [ParamGroup("all", names)]

    # whether long preparation work (a latent-cache build) shows progress bars; the Trainer sets it from its own
    # ``progress`` (``snapgen train --no-progress`` turns every bar of a run off)
    progress: bool = True

    def prepare(self, run_dir: Path) -> None:
        pass

    def loss(self, step: int, part: int = 0):
        raise NotImplementedError

    def sample(self, path: Path, step: int) -> None:
        pass

    def export(self, out_dir: Path) -> Path:
        raise NotImplementedError

    def data_state(self) -> dict | None:
        return None

    def load_data_state(self, state: dict) -> None:
        pass

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The trained modules by name (the pre-protocol interface)."""
        return {n: m for n, (m, roles) in self.modules().items() if "trained" in roles}


def module_roles(task) -> dict[str, tuple[nn.Module, frozenset[str]]]:
    """``task.modules()`` checked; an object with only ``trainable_modules()`` (the pre-protocol interface)
    gets every role for each of them."""
    if isinstance(task, Task) or not hasattr(task, "trainable_modules"):
        out = {}
        for name, (module, roles) in task.modules().items():
            roles = frozenset(roles)
            if not roles <= ROLES:
                raise ValueError(f"module {name!r}: unknown roles {sorted(roles - ROLES)}; valid: {sorted(ROLES)}")
            if "ema" in roles and not {"trained", "exported"} <= roles:
                raise ValueError(f"module {name!r}: role 'ema' needs 'trained' and 'exported' (EMA weights exist "
                                 f"to be exported; critics and projectors are trained without EMA)")
            out[name] = (module, roles)
        return out
    return {n: (m, DEFAULT_ROLES) for n, m in task.trainable_modules().items()}


def param_groups(task, modules: dict) -> list[ParamGroup]:
    """The task's parameter groups, checked to cover every trained module exactly once."""
    trained = [n for n, (_, roles) in modules.items() if "trained" in roles]
    groups = task.param_groups() if hasattr(task, "param_groups") else [ParamGroup("all", tuple(trained))]
    seen: dict[str, str] = {}
    for g in groups:
        for m in g.modules:
            if m not in trained:
                raise ValueError(f"parameter group {g.name!r} lists {m!r}, not a trained module ({trained})")
            if m in seen:
                raise ValueError(f"module {m!r} is in parameter groups {seen[m]!r} and {g.name!r}")
            seen[m] = g.name
    missing = [m for m in trained if m not in seen]
    if missing:
        raise ValueError(f"trained modules {missing} are in no parameter group")
    if len({g.name for g in groups}) != len(groups):
        raise ValueError(f"parameter group names repeat: {[g.name for g in groups]}")
    return groups
