"""LoRA adapters for snapgen transformers: add, switch, save/load, and merge exactly into the weights.

Adapters live on the model's ``ElasticLinear`` layers (attention q/k/v/out and FFN by default), are named,
and are switched model-wide: one set of base weights serves several functions -- the paper's few-step
teacher is the 28-step teacher with its "Lightning" LoRA switched on. On an elastic supernetwork an adapter
is sliced with the width like its host weight, so ``B_slice @ A_slice`` is exactly the slice of ``B @ A``
and merging into the full weight is exact at every width.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from .elastic import ElasticLinear
from .io import atomic_save_safetensors

__all__ = ["DEFAULT_TARGETS", "add_lora", "set_adapter", "use_adapter", "adapter_names", "lora_parameters",
           "merge_lora", "save_lora", "load_lora", "remove_lora"]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")


def _targets(model: torch.nn.Module, targets) -> list[tuple[str, ElasticLinear]]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, ElasticLinear) and n.rsplit(".", 1)[-1] in set(targets)]
    if not found:
        raise ValueError(f"no Linear layer named any of {sorted(targets)} in {type(model).__name__}")
    # per-width modulation keeps one copy of these per width (plain layers, no adapters): an adapter on the
    # full one would change the full width only, so refuse instead
    per_width = {f"{n}.{local}" if n else local for n, m in model.named_modules()
                 for local in (m.per_width_layers() if hasattr(m, "per_width_layers") else ())}
    clash = sorted(n for n, _ in found if n in per_width)
    if clash:
        raise ValueError(f"LoRA targets {clash} are per-width modulation layers (elastic_modulation="
                         f"'per_width'): one copy per width, no adapters; choose other targets")
    return found


def add_lora(model: torch.nn.Module, name: str, rank: int = 64, alpha: float = 128.0,
             targets=DEFAULT_TARGETS) -> list[torch.nn.Parameter]:
    """Add adapter ``name`` (zero update at creation) to every target Linear; returns its parameters."""
    if not name.isidentifier():
        raise ValueError(f"adapter name {name!r} must be an identifier")
    params = []
    for _, layer in _targets(model, targets):
        lora = layer.add_adapter(name, rank, alpha)
        params += [lora.A, lora.B]
    model._snapgen_lora = {**getattr(model, "_snapgen_lora", {}),
                           name: {"rank": int(rank), "alpha": float(alpha), "targets": list(targets)}}
    return params


def adapter_names(model: torch.nn.Module) -> list[str]:
    return sorted(getattr(model, "_snapgen_lora", {}))


def set_adapter(model: torch.nn.Module, name: str | None) -> None:
    """Compute with adapter ``name`` on (``None``: base weights only)."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model) or 'none'}")
    for m in model.modules():
        if isinstance(m, ElasticLinear):
            m.active_adapter = name
    model._snapgen_active_adapter = name


@contextlib.contextmanager
def use_adapter(model: torch.nn.Module, name: str | None):
    previous = getattr(model, "_snapgen_active_adapter", None)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


def lora_parameters(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if f".lora.{name}." in k}


def remove_lora(model: torch.nn.Module, name: str) -> None:
    for m in model.modules():
        if isinstance(m, ElasticLinear) and "lora" in m._modules and name in m.lora:
            del m.lora[name]
            if m.active_adapter == name:
                m.active_adapter = None
    model._snapgen_lora = {k: v for k, v in getattr(model, "_snapgen_lora", {}).items() if k != name}


@torch.no_grad()
def merge_lora(model: torch.nn.Module, name: str, inplace: bool = False) -> torch.nn.Module:
    """Fold adapter ``name`` into the base weights (``W += scale * B @ A``) and remove it: the result
    computes what the model computed with the adapter on, with no adapter code left (for export)."""
    if name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model) or 'none'}")
    out = model if inplace else copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, ElasticLinear) and "lora" in m._modules and name in m.lora:
            m.weight.add_(m.adapter_delta(name).to(m.weight.dtype))
    remove_lora(out, name)
    return out


def save_lora(model: torch.nn.Module, name: str, path: str | os.PathLike, **meta) -> Path:
    """Write adapter ``name`` as safetensors (its tensors) with its settings in the metadata."""
    info = getattr(model, "_snapgen_lora", {}).get(name)
    if info is None:
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model) or 'none'}")
    state = {k.replace(f".lora.{name}.", ".lora."): p.detach().float().contiguous()
             for k, p in lora_parameters(model, name).items()}
    header = {"format": "snapgen-lora", "name": name, **{k: json.dumps(v) for k, v in {**info, **meta}.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, path, metadata=header)
    return path


def load_lora(model: torch.nn.Module, path: str | os.PathLike, name: str | None = None) -> str:
    """Add the adapter stored at ``path`` to ``model`` (under ``name``, default its saved name); returns the name."""
    from .io import read_safetensors

    state, meta = read_safetensors(path, "snapgen-lora", "snapgen LoRA file")
    name = name or meta["name"]
    rank, alpha, targets = (json.loads(meta[k]) for k in ("rank", "alpha", "targets"))
    add_lora(model, name, rank, alpha, targets)
    own = {k.replace(f".lora.{name}.", ".lora."): p for k, p in lora_parameters(model, name).items()}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state))[:3], sorted(set(state) - set(own))[:3]
        remove_lora(model, name)
        raise ValueError(f"{path} does not fit this model (missing {missing}, unexpected {extra}): it was "
                         f"trained for another architecture")
    with torch.no_grad():
        for k, p in own.items():
            if p.shape != state[k].shape:
                remove_lora(model, name)
                raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(p.shape)}")
            p.copy_(state[k])
    return name
