"""Training checkpoints: safetensors + JSON only, written atomically, restored exactly.

A checkpoint is a folder ``checkpoints/step_0001000/`` holding

- ``model.safetensors``      trained weights (every trainable module of the task, prefixed by name)
- ``ema.safetensors``        the exponential moving average of the same weights
- ``optimizer.safetensors``  optimizer tensors (``state.<param index>.<name>``) + ``optimizer.json``
                             (param groups and non-tensor state)
- ``rng.safetensors``        the torch global RNG state, the task's own generator state and each rank's
                             CUDA RNG state (:mod:`.rng`)
- ``state.json``             step, wall time so far, and anything else the trainer keeps
- ``data_state.json``        (streamed data only) every rank's position in its shard stream

It is written to a hidden temporary folder and renamed into place, so a run killed at any moment
(even with SIGKILL) leaves either the complete checkpoint or none. ``latest_checkpoint`` skips folders
that fail to load (with a warning) and falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .rng import capture_rng

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "optimizer_to_tensors",
           "optimizer_from_tensors"]

_STEP_RE = re.compile(r"^step_(\d+)$")
REQUIRED = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
            "state.json")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{name}"] = val.detach().contiguous().cpu()
            else:
                extra.setdefault(str(idx), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": extra}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for idx, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    saved, now = meta["param_groups"], opt.param_groups
    if len(saved) != len(now):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's has {len(now)} "
                         f"({sorted({g.get('group', '?') for g in now})}): it was written by an older snapgen whose "
                         f"distillation tasks kept generator and critic in one group. Start the run in a new run_dir "
                         f"(the weights of its last export can be the new run's init)")
    opt.load_state_dict({"state": state, "param_groups": saved})


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: dict[str, torch.Tensor] | torch.Generator | None, state: dict, keep: int = 2,
                    extra_json: dict[str, object] | None = None) -> Path:
    """``rng``: :func:`snapgen.train.rng.capture_rng`'s dict (a task generator or None: the CPU states only)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, tmp / "model.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", opt_meta)
    if not isinstance(rng, dict):
        rng = capture_rng(rng)
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    _write_json(tmp / "state.json", {"step": step, **state})
    for name, obj in (extra_json or {}).items():
        _write_json(tmp / name, obj)
    # fsync the files so a power cut after the rename cannot leave empty files behind
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read every file of a checkpoint; raises ValueError naming the broken file."""
    path = Path(path)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {missing}")
    out = {}
    try:
        for name in ("model", "ema", "optimizer", "rng"):
            out[name] = load_file(str(path / f"{name}.safetensors"))
        out["optimizer_meta"] = json.loads((path / "optimizer.json").read_text())
        out["state"] = json.loads((path / "state.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt ({e})") from None
    return out


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None. Broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"{e}; falling back to an older checkpoint", stacklevel=2)
    return None
