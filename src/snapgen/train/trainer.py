"""The training loop shared by every task: AdamW + warm-up over the task's parameter groups (own lr, betas,
weight decay and gradient clip each; :mod:`.optim`), EMA of the modules with role ``ema``, data parallelism
and gradient accumulation for every task, checkpoints, exact resume. Tasks: :mod:`snapgen.tasks`.

Exact resume: everything random is either a pure function of ``(seed, step)`` (which data items form a
batch) or drawn from RNGs whose states are checkpointed (the task's generator for noise and times; the
global torch RNG of the CPU and of each rank's CUDA device for dropout and caption drops: :mod:`.rng`).
Weights, EMA and optimizer tensors are stored bit-exact in safetensors.
So a run killed at any point (SIGKILL included) and resumed from its last checkpoint computes the same
later losses as a run that was never interrupted (``tests/test_train.py`` checks this).

A non-finite loss stops the run with :class:`TrainingDiverged` *before* the optimizer step, so the last
checkpoint on disk is the last good state. Ctrl-C saves a checkpoint and exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..utils.device import resolve_device
from ..utils.memory import retain_freed_memory
from ..tasks import build_task, module_roles, param_groups
from .checkpoint import latest_checkpoint, optimizer_from_tensors, save_checkpoint
from .config import TrainConfig
from .optim import build_optimizer, clip_gradients, set_lr
from .rng import capture_rng, restore_rng

__all__ = ["Trainer", "TrainingDiverged", "lr_at"]


# Keys that do not change what is trained, so a run may be resumed (or re-exported) with new values.
RESUME_MAY_CHANGE = ("steps", "run_dir", "sampling", "export", "sample_every", "log_every", "ckpt_every",
                     "keep_checkpoints", "threads", "distributed", "plan")


class TrainingDiverged(RuntimeError):
    pass


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    o = cfg.optim
    if o.warmup > 0 and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "constant":
        return o.lr
    span = max(1, cfg.steps - o.warmup)
    progress = min(1.0, (step - o.warmup) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Runs a task (see ``snapgen.tasks``) for ``cfg.steps`` optimizer steps in ``cfg.run_dir``."""

    def __init__(self, cfg: TrainConfig, task=None, progress: bool = True):
        from .distributed import DistributedContext, LossModule, read_settings

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.device)
        self.dist = DistributedContext.from_env(self.device.type)  # torchrun: one process per rank
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.progress = progress and self.dist.is_main
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cpu":  # reuse freed step memory instead of page-faulting it in each step
            retain_freed_memory()
        torch.manual_seed(cfg.seed)
        self.task = task if task is not None else build_task(cfg, self.device)
        self.strategy, self.accumulation, reshard = read_settings(
            cfg.distributed, cfg.task, getattr(self.task, "strategies", ("ddp", "fsdp")), self.dist.enabled)
        self.parts = self.dist.world * self.accumulation
        if hasattr(self.task, "set_data_parallel"):  # the part of the global batch; streamed data: own shards
            self.task.set_data_parallel(self.dist.rank, self.dist.world, self.parts)
        elif self.parts > 1:
            raise ValueError(f"task {cfg.task!r} does not support data parallelism or gradient accumulation "
                             f"(it has no set_data_parallel; see snapgen.tasks.Task)")
        roles = module_roles(self.task)
        self.modules = {n: m for n, (m, r) in roles.items() if "trained" in r}
        if self.strategy == "fsdp":  # bf16: MixedPrecisionPolicy (on CPU too), not autocast
            from .distributed import mixed_precision_policy, reshard_after_forward, shard_modules

            self.fsdp = shard_modules(self.modules, self.dist.world, self.device.type,
                                      mixed_precision_policy(cfg.precision),
                                      reshard_after_forward(reshard, getattr(self.task, "widths_per_step", 1)))
            if self.dist.is_main:
                print(f"fsdp: {self.fsdp}")
        self.params = {f"{m}.{n}": p for m, mod in self.modules.items() for n, p in mod.named_parameters()
                       if p.requires_grad}
        self.groups = param_groups(self.task, roles)
        self.optimizer, self.group_states = build_optimizer(self.groups, self.params, cfg.optim)
        averaged = {n for n, (_, r) in roles.items() if "ema" in r}  # critics and projectors: no EMA
        self.ema = {k: p.detach().clone() for k, p in self.params.items() if k.split(".", 1)[0] in averaged}
        self.loss_module = None
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters: a step may leave some parameters unused (no dropped caption -> null
            # embedding unused; an elastic width not sampled this step)
            self.loss_module = DDP(LossModule(self.task, self.modules), find_unused_parameters=True,
                                   device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all sessions
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.precision == "bf16"
                         and self.device.type == "cuda" and self.strategy != "fsdp" else contextlib.nullcontext())
        if cfg.precision == "bf16" and self.device.type != "cuda" and self.strategy != "fsdp":
            print("note: precision bf16 is used on CUDA only (or with FSDP); training in fp32 on CPU "
                  "(bf16 matmul has no fast CPU kernel)")

    # ---------------------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _check_same_config(self) -> None:
        if not self.dist.is_main:  # rank 0 checks and writes; the others wait for it
            self.dist.barrier()
            return
        self._check_same_config_main()
        self.dist.barrier()

    def _check_same_config_main(self) -> None:
        saved = self.run_dir / "config.yaml"
        now = self.cfg.to_dict()
        if saved.is_file():
            before = yaml.safe_load(saved.read_text())
            # a key added to TrainConfig after the run started is unchanged if it still has its default
            defaults = TrainConfig(task=self.cfg.task).to_dict()
            before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
            for k, v in defaults.items():  # ... also inside sections (optim.clip_mode, optim.groups)
                if isinstance(v, dict) and isinstance(before.get(k), dict):
                    before[k] = {**v, **before[k]}
            changed = sorted(k for k in set(before) | set(now)
                             if k not in RESUME_MAY_CHANGE and before.get(k) != now.get(k))
            if changed:
                raise ValueError(f"{self.run_dir} holds a run with a different config (changed: {changed}). "
                                 f"Resume with the same config (only {', '.join(RESUME_MAY_CHANGE)} may change), "
                                 f"or pick a new run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(now, sort_keys=False))
        os.replace(tmp, saved)

    def _record_env(self, stage: str) -> None:
        """``env.json`` beside config.yaml: the settings in force (:func:`snapgen.env.describe`), rewritten when a
        session starts (after resuming) and when it finishes (then with the BNA backends ``auto`` chose)."""
        from ..attention.backend import modules_backend
        from ..env import record

        record(self.run_dir / "env.json", modules_backend(self.modules), stage=stage, step=self.step,
               world=self.dist.world, **({"fsdp": self.fsdp} if self.strategy == "fsdp" else {}))

    def resume(self) -> bool:
        from .checkpoint import list_checkpoints

        newest = list_checkpoints(self.ckpt_dir)
        if newest and (newest[-1] / "dcp").is_dir() and (newest[-1] / "state.json").is_file():
            return self._resume_sharded(newest[-1])
        if self.strategy == "fsdp" and newest:
            raise ValueError(f"{newest[-1]} is a consolidated checkpoint; an FSDP run resumes from sharded (DCP) "
                             f"checkpoints only. Resume it single-process or with strategy ddp")
        found = latest_checkpoint(self.ckpt_dir)
        if found is None:
            return False
        path, ck = found
        for k, p in self.params.items():
            if k not in ck["model"]:
                raise ValueError(f"checkpoint {path} lacks parameter {k}; it belongs to another model")
            p.data.copy_(ck["model"][k])
        for k, e in self.ema.items():
            e.copy_(ck["ema"][k])
        optimizer_from_tensors(self.optimizer, ck["optimizer"], ck["optimizer_meta"])
        self._restore_rng(ck["rng"], path)
        self.step = int(ck["state"]["step"])
        self.elapsed = float(ck["state"].get("elapsed", 0.0))
        self._load_data_state(path)
        self._truncate_metrics(self.step)
        if self.dist.is_main:
            print(f"resumed from {path} (step {self.step})")
        return True

    def _capture_rng(self) -> dict:
        """RNG states to checkpoint (:mod:`.rng`); a collective with several ranks (each rank's CUDA state)."""
        return capture_rng(self.task.generator, self.device, self.dist)

    def _restore_rng(self, states: dict, path: Path) -> None:
        restore_rng(states, self.task.generator, self.device, self.dist.rank, self.dist.world, where=str(path))

    # --- streamed data position (one per rank) ----------------------------------------------------------
    def _data_states(self) -> dict | None:
        """Every rank's stream position, gathered (all ranks must call this), or None without streaming."""
        state = self.task.data_state() if hasattr(self.task, "data_state") else None
        if state is None:
            return None
        return {"world": self.dist.world, "ranks": self.dist.gather(state)}

    def _load_data_state(self, path: Path) -> None:
        f = path / "data_state.json"
        if not (f.is_file() and hasattr(self.task, "load_data_state")) or self.task.data_state() is None:
            return
        saved = json.loads(f.read_text())
        if saved["world"] == self.dist.world:
            self.task.load_data_state(saved["ranks"][self.dist.rank])
            return
        # another world size splits the shards differently: no exact position exists. Every rank starts the
        # epoch after the furthest one (nothing is repeated; the rest of the interrupted epoch is skipped).
        epoch = max(r["stream"]["epoch"] for r in saved["ranks"]) + 1
        skipped = sum(r["stream"].get("skipped", 0) for r in saved["ranks"]) if self.dist.is_main else 0
        if self.dist.is_main:
            print(f"note: the checkpoint's data streams belong to {saved['world']} rank(s), this run has "
                  f"{self.dist.world}; streams restart at epoch {epoch}")
        self.task.load_data_state({"stream": {"epoch": epoch, "shard": 0, "offset": 0, "skipped": skipped},
                                   "pending": []})

    def _resume_sharded(self, path: Path) -> bool:
        from .sharded import resume_sharded

        return resume_sharded(self, path)

    def _save_sharded(self) -> Path:
        from .sharded import save_sharded

        return save_sharded(self)

    def save(self) -> Path | None:
        """Rank 0 writes (all ranks hold the same state); the others wait for the checkpoint to exist."""
        if self.strategy == "fsdp":
            return self._save_sharded()
        data_states, rng = self._data_states(), self._capture_rng()
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        path = save_checkpoint(self.ckpt_dir, self.step,
                               {k: p.detach() for k, p in self.params.items()}, self.ema, self.optimizer,
                               rng, {"elapsed": self.elapsed}, keep=self.cfg.keep_checkpoints,
                               extra_json={"data_state.json": data_states} if data_states is not None else None)
        self._plot()
        self.dist.barrier()
        return path

    # ---------------------------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after ``step`` (they are recomputed after a resume)."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.metrics_path)

    def _log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        from .plots import plot_metrics

        plot_metrics(self.metrics_path, self.run_dir / "loss.png")  # without snapgen[plots]: one note, no plot

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the modules (for samples and export)."""
        backup = {k: self.params[k].detach().clone() for k in self.ema}
        try:
            for k, e in self.ema.items():
                self.params[k].data.copy_(e)
            yield
        finally:
            for k, b in backup.items():
                self.params[k].data.copy_(b)

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        if self.cfg.ema_warmup:
            d = min(d, (1 + self.step) / (10 + self.step))
        for k, e in self.ema.items():
            e.lerp_(self.params[k].detach(), 1 - d)

    # ---------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict:
        cfg = self.cfg
        self._check_same_config()
        self.task.progress = self.progress
        self.task.prepare(self.run_dir)
        if resume:
            self.resume()
        else:
            self._truncate_metrics(0)
        if self.dist.is_main:
            self._record_env("start")
        if self.step >= cfg.steps:
            print(f"run already at step {self.step} >= steps {cfg.steps}; exporting")
            return self.finish()
        for m in self.modules.values():
            m.train()
        if self.parts > 1 and self.dist.is_main:
            print(f"data parallel: {self.dist.world} rank(s) x {self.accumulation} accumulation step(s) x batch "
                  f"{cfg.batch_size} = global batch {cfg.batch_size * self.parts}"
                  + (f" ({self.dist.backend})" if self.dist.enabled else ""))
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.task}", disable=not self.progress,
                   dynamic_ncols=True)
        window: list[dict] = []
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, cfg)
                set_lr(self.optimizer, self.group_states, lr)
                self.optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for micro in range(self.accumulation):
                    part = micro * self.dist.world + self.dist.rank
                    sync = (self.loss_module.no_sync() if self.loss_module is not None and micro < self.accumulation - 1
                            else contextlib.nullcontext())
                    with sync:
                        with self.autocast:
                            if self.loss_module is not None:
                                loss, logs = self.loss_module(self.step, part)
                            elif self.parts > 1:
                                loss, logs = self.task.loss(self.step, part)
                            else:
                                loss, logs = self.task.loss(self.step)
                        if self.dist.any(not bool(torch.isfinite(loss))):
                            raise TrainingDiverged(
                                f"loss is {loss.item()} at step {self.step}; stopping. The last good checkpoint is "
                                f"kept in {self.ckpt_dir}. Lower optim.lr, keep optim.grad_clip on, or check the data")
                        (loss / self.accumulation if self.accumulation > 1 else loss).backward()
                    loss_value += loss.item() / self.accumulation
                norms = clip_gradients(self.group_states, cfg.optim)
                self.optimizer.step()
                self.step += 1
                self._update_ema()
                self.elapsed += time.perf_counter() - t0
                window.append({"loss": self.dist.mean(loss_value), **norms, **logs})
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    rec = self._reduce(window)
                    rec.update(step=self.step, lr=lr, elapsed=round(self.elapsed, 2))
                    if self.dist.is_main:
                        self._log(rec)
                    window = []
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted at step {self.step}: saving a checkpoint")
            self.save()
            raise
        bar.close()
        return self.finish()

    @staticmethod
    def _reduce(window: list[dict]) -> dict:
        out: dict = {}
        bins: dict[int, list[float]] = {}
        for rec in window:
            for k, v in rec.items():
                if k == "bins":
                    for i, (s, c) in enumerate(v):
                        acc = bins.setdefault(i, [0.0, 0])
                        acc[0] += s
                        acc[1] += c
                else:
                    out.setdefault(k, []).append(v)
        red = {k: sum(v) / len(v) for k, v in out.items()}
        if bins:
            red["loss_per_bin"] = [round(s / c, 6) if c else None for s, c in (bins[i] for i in sorted(bins))]
        return red

    def sample(self) -> None:
        if not self.dist.is_main or self.strategy == "fsdp":  # sharded weights: samples come from the export
            return
        for m in self.modules.values():
            m.eval()
        with self.ema_weights():
            self.task.sample(self.run_dir / "samples" / f"step_{self.step:07d}.png", self.step)
        for m in self.modules.values():
            m.train()

    def finish(self) -> dict:
        if self.strategy == "fsdp":
            return self._finish_sharded()
        if not self.dist.is_main:
            self.dist.barrier()
            return {"steps": self.step, "rank": self.dist.rank}
        out = self._finish_main()
        self.dist.barrier()
        return out

    def _finish_sharded(self) -> dict:
        from .sharded import finish_sharded

        return finish_sharded(self)

    def _finish_main(self) -> dict:
        for m in self.modules.values():
            m.eval()
        with self.ema_weights():
            out = self.task.export(self.run_dir / "final")
        self._plot()
        summary = {"steps": self.step, "train_seconds": round(self.elapsed, 1), "final_dir": str(out)}
        last = None
        if self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
        if last:
            summary["final_loss"] = last["loss"]
        self._record_env("finish")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
