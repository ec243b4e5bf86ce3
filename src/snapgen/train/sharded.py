"""FSDP runs of the trainer: sharded (torch.distributed.checkpoint) save and resume, and the export that
gathers the sharded weights first. Moved out of :mod:`.trainer`; ``Trainer._save_sharded`` etc. delegate here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..tasks.base import module_roles
from ..tasks.registry import build_task


def resume_sharded(trainer, path: Path) -> bool:
    """A DCP checkpoint (FSDP run), loaded at this run's world size and sharding (or none)."""
    from safetensors.torch import load_file

    from .distributed import load_dcp

    load_dcp(path / "dcp", trainer.modules, trainer.params, trainer.ema, trainer.optimizer)
    meta = json.loads((path / "optimizer.json").read_text())
    for g, saved in zip(trainer.optimizer.param_groups, meta["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    trainer._restore_rng(load_file(str(path / "rng.safetensors")), path)
    state = json.loads((path / "state.json").read_text())
    trainer.step, trainer.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
    trainer._load_data_state(path)
    trainer._truncate_metrics(trainer.step)
    if trainer.dist.is_main:
        print(f"resumed from sharded checkpoint {path} (step {trainer.step}, now {trainer.dist.world} rank(s))")
    return True


def save_sharded(trainer) -> Path:
    """FSDP: every rank writes its shards with torch.distributed.checkpoint; rank 0 the small files. The
    folder appears complete or not at all (written under a temporary name, renamed by rank 0)."""
    import shutil

    from safetensors.torch import save_file

    from .checkpoint import list_checkpoints
    from .distributed import save_dcp

    final = trainer.ckpt_dir / f"step_{trainer.step:07d}"
    tmp = trainer.ckpt_dir / f".tmp_step_{trainer.step:07d}"
    data_states, rng = trainer._data_states(), trainer._capture_rng()
    if trainer.dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    trainer.dist.barrier()
    save_dcp(tmp / "dcp", trainer.modules, trainer.params, trainer.ema, trainer.optimizer)
    trainer.dist.barrier()
    if trainer.dist.is_main:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups}) + "\n")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": trainer.step, "elapsed": trainer.elapsed,
                                                    "format": "dcp", "world": trainer.dist.world}) + "\n")
        if data_states is not None:
            (tmp / "data_state.json").write_text(json.dumps(data_states) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        keep = trainer.cfg.keep_checkpoints
        for old in list_checkpoints(trainer.ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        trainer._plot()
    trainer.dist.barrier()
    return final


def finish_sharded(trainer) -> dict:
    """FSDP: gather the exported weights (EMA where kept; a collective), then rank 0 exports them from an
    unsharded copy."""
    from .distributed import full_tensor

    roles = module_roles(trainer.task)
    exported = {n for n, (_, r) in roles.items() if "exported" in r and "trained" in r}
    full = {k: full_tensor(trainer.ema[k] if k in trainer.ema else p.detach()).detach().cpu()
            for k, p in trainer.params.items() if k.split(".", 1)[0] in exported}
    if not trainer.dist.is_main:
        trainer.dist.barrier()
        return {"steps": trainer.step, "rank": trainer.dist.rank}
    task = build_task(trainer.cfg, trainer.device)
    task.prepare(trainer.run_dir)
    mods = {n: m for n, (m, r) in module_roles(task).items() if "trained" in r}
    params = {f"{m}.{n}": p for m, mod in mods.items() for n, p in mod.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for k, v in full.items():
            params[k].copy_(v)
    for m in mods.values():
        m.eval()
    out = task.export(trainer.run_dir / "final")
    trainer._plot()
    summary = {"steps": trainer.step, "train_seconds": round(trainer.elapsed, 1), "final_dir": str(out),
               "strategy": "fsdp", "world": trainer.dist.world}
    trainer._record_env("finish")
    (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.dist.barrier()
    return summary
