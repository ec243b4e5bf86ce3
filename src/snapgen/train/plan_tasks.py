"""The memory plan of a whole training config (``snapgen plan``): the components each task holds per GPU.

``flow`` (stages 1-2 of the paper recipe), in the order a step runs them:

1. with a ``kd:`` section, the frozen teacher (SnapGen++ Sec. 3.1): weights in its dtype, divided over the
   ranks when sharded; its no-grad forward's working set at the per-GPU batch (plus two gathered blocks when
   sharded); its targets (velocity + last-block features) held until the backward; its own text encoder
   when it has one (the paper's Qwen-Image reads Qwen2.5-VL features, which the student's latent shards do
   not hold);
2. the student: fp32 weights, gradients, AdamW and EMA (sharded with FSDP2), and the activations of every
   width of the step (:func:`snapgen.train.plan.student_component`); the KD projectors (trained, no EMA);
   FSDP's two gathered blocks;
3. the student's text encoder and the VAE: only when the run loads them (sample grids, or a latent cache the
   run builds itself); with precomputed latents and caption features they are never loaded.

``dmd`` / ``kdmd`` (stage 3; DDP only, nothing sharded): the frozen base at ``model.init_from`` (fp32) hosts
each width's student LoRA (trained, EMA) and the few-step teacher's LoRA; one critic per width is a full copy
of the base (fp32, frozen) with its own trained LoRA; projectors per width (kdmd). Held: every width's
student and critic activations (one backward for all; no gradient checkpointing in the distillation task);
working: the teacher with CFG (2x batch). The teacher is the base itself -- the trainer's stand-in for the
paper's Qwen-Image -- unless ``plan.teacher`` declares the paper's (then counted as its own component).

Where the sizes come from: ``plan.teacher`` / ``plan.base`` / ``plan.text_encoder`` / ``plan.vae``
(:mod:`snapgen.train.plan_models`) when declared, else the run's folders (``kd.teacher``,
``model.init_from``, ...) when they exist here; otherwise an error that names the key to add.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .plan import (DTYPE_BYTES, Component, GiB, MemoryPlan, frozen, fsdp_gathered, student_component, trained)
from .plan_models import ModelSize, model_size

__all__ = ["plan_config", "widths_per_step"]

_PLAN_KEYS = {"teacher", "base", "text_encoder", "vae"}
_SAVED: dict = {}  # per-sample activation measurements, reused by the plans of other GPU counts / batches


def widths_per_step(mcfg, elastic: dict) -> list[str]:
    """The sub-networks one elastic training step runs: full + the smallest + ``num_random`` others (the sandwich
    rule; the next-smallest stand in for the random ones, which have the same size or less)."""
    widths = ["full"]
    if mcfg.elastic_variants:
        ranked = sorted(mcfg.elastic_variants, key=lambda v: v[1])
        widths += [ranked[0][0]] + [n for n, _ in ranked[1:][: int(elastic.get("num_random", 1))]]
    return widths


def plan_config(cfg, gpus: int, batch_per_gpu: int | None = None, strategy: str | None = None,
                resolution: int | None = None, text_len: int | None = None,
                gpu_memory: float = 80 * GiB) -> MemoryPlan:
    """Per-GPU memory of training config ``cfg`` (a :class:`snapgen.train.TrainConfig`) on ``gpus`` GPUs;
    ``text_len`` defaults to the config's ``text.max_length`` (else 300, the paper configs' caption length)."""
    text_len = int(text_len or cfg.text.get("max_length", 300))
    plan = dict(cfg.plan or {})
    unknown = sorted(set(plan) - _PLAN_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in plan:; valid: {sorted(_PLAN_KEYS)}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    batch = int(batch_per_gpu or cfg.batch_size)
    res = resolution or cfg.data.get("resolution", 256)
    res = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
    act_bytes = 2 if cfg.precision == "bf16" else 4
    if cfg.task == "flow":
        return _plan_flow(cfg, plan, gpus, batch, strategy or cfg.distributed.get("strategy", "ddp"), res, text_len,
                          act_bytes, gpu_memory)
    if cfg.task in ("dmd", "kdmd"):
        if (strategy or cfg.distributed.get("strategy", "ddp")) != "ddp":
            raise ValueError(f"task {cfg.task} trains with DDP only (tasks/dmd.py: strategies = ('ddp',))")
        return _plan_distill(cfg, plan, gpus, batch, res, text_len, act_bytes, gpu_memory)
    raise ValueError(f"snapgen plan covers the flow, dmd and kdmd tasks; {cfg.task!r} is not one of them")


# ------------------------------------------------------------------------------------------------------ flow
def _plan_flow(cfg, plan, gpus, batch, strategy, res, text_len, act_bytes, gpu_memory) -> MemoryPlan:
    from ..models import build_model

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    shard = gpus if strategy == "fsdp" else 1
    with torch.device("meta"):
        model = build_model({k: v for k, v in cfg.model.items() if k != "init_from"})
    mcfg = model.config
    widths = widths_per_step(mcfg, cfg.elastic)
    latent = (mcfg.in_channels, res[0] // mcfg.vae_factor, res[1] // mcfg.vae_factor)
    comps, notes = [], []
    teacher = None
    if cfg.kd:
        if "teacher" in plan:
            teacher = model_size(plan["teacher"], "plan.teacher", "teacher")
            notes.append(f"teacher sized from plan.teacher ({teacher.source}), not from kd.teacher: the paper's "
                         f"teacher; the trainer's kd teacher is a snapgen pipeline, loaded in fp32 and replicated")
        else:
            teacher = _folder_model(cfg.kd.get("teacher"), "kd.teacher", "plan.teacher")
        comps += _teacher_components(teacher, batch, gpus, latent, text_len, act_bytes, cfg=1)
    key = json.dumps({k: v for k, v in cfg.model.items() if k != "init_from"}, sort_keys=True)
    comps.append(student_component(model, res, text_len, batch, shard, cfg.grad_checkpointing, act_bytes, widths,
                                   cache=_SAVED, key=key))
    comps.append(_conditioning(cfg, mcfg, shard, notes))
    if teacher is not None:
        tw = teacher.feature_width or 0
        if not tw:
            notes.append("KD projectors not counted: the teacher's feature width is unknown (declare it by class)")
        ratios = dict(model.variants)
        p = sum(int(mcfg.width * ratios[w]) * tw + tw for w in ratios) if tw else 0
        tokens = _tokens(mcfg, latent)
        held = sum(batch * tokens * int(mcfg.width * ratios[w]) * act_bytes for w in widths) if tw else 0.0
        comps.append(trained("KD projectors", p, shard, ema=False, held=held,
                             note=f"Linear(width -> {tw}) per width, no EMA"))
    comps += fsdp_gathered(model, strategy, gpus)
    online = bool(cfg.sampling.get("prompts")) or ("spec" in cfg.data and not cfg.data.get("shards"))
    why = "sample grids / the run builds its latent cache" if online else ""
    comps.append(_encoder(plan, "text_encoder", "text encoder (student)", cfg.text.get("encoder", "minilm"), online,
                          why, "caption features precomputed", shard))
    comps.append(_encoder(plan, "vae", "VAE", cfg.vae.get("path"), online, why, "latents precomputed", shard))
    return MemoryPlan(gpus, strategy, batch, comps, gpu_memory, notes)


def _conditioning(cfg, mcfg, shard, notes) -> Component:
    """The trained text conditioning (``snapgen.text.TextConditioning``, one encoder): its null embedding, and a
    projection when the encoder's width is not the model's ``text_dim``. The width as ``FlowTask`` infers it."""
    spec = cfg.text.get("encoder", "minilm")
    dim = 384 if spec == "minilm" else None
    if dim is None and (Path(str(spec)) / "config.json").is_file():
        c = json.loads((Path(str(spec)) / "config.json").read_text())
        c = c.get("text_config", c)
        dim = next((int(c[k]) for k in ("hidden_size", "d_model", "dim") if k in c), None)
    if dim is None:
        dim = mcfg.text_dim
        notes.append(f"text encoder {spec} is not here: its width is taken as the model's text_dim ({dim})")
    p = dim + (0 if dim == mcfg.text_dim else dim * mcfg.text_dim + mcfg.text_dim)
    return trained("text conditioning", p, shard, note=f"null embedding{' + projection' if p > dim else ''}")


def _tokens(mcfg, latent) -> int:
    return (latent[1] // mcfg.patch_size) * (latent[2] // mcfg.patch_size)


def _teacher_components(t: ModelSize, batch, gpus, latent, text_len, act_bytes, cfg: int) -> list[Component]:
    """The frozen teacher: weights (sharded or not), the working set of one forward at ``cfg`` x ``batch``
    samples (CFG doubles the batch), two gathered blocks when sharded, its targets held at ``batch``."""
    per, kept = t.working(latent, text_len)
    scale = act_bytes / 4 if t.dtype == "fp32" else 1.0  # an fp32 model under bf16 autocast computes in bf16
    shard = gpus if t.shard else 1
    gathered = 2 * t.largest_block * DTYPE_BYTES[t.dtype] if t.shard and gpus > 1 else 0
    note = f"frozen, {'sharded over ' + str(gpus) if shard > 1 else 'replicated'}"
    note += f", forward at batch {cfg * batch}" if per else ", working set not measured (size by params)"
    comps = [frozen(f"teacher ({t.name})", t.params, t.dtype, shard, working=per * scale * cfg * batch + gathered,
                    held=kept * scale * batch, note=note)]
    if t.text_encoder is not None:
        e = t.text_encoder
        comps.append(frozen(f"teacher text encoder ({e.name})", e.params, e.dtype, gpus if e.shard else 1,
                            note="frozen, runs every step (working set not counted)"))
    return comps


def _encoder(plan, key, label, setting, online, why, offline_note, shard) -> Component:
    """The student's text encoder / the VAE: counted only when the run loads it."""
    if not online:
        return Component(label, note=f"not loaded: {offline_note}")
    if setting == "minilm":  # the bundled encoder (snapgen.text.MiniLMEncoder): its folder is installed
        from ..text import minilm_path

        setting = minilm_path()
    if key in plan:
        m = model_size(plan[key], f"plan.{key}", label)
    elif setting and Path(str(setting)).is_dir():
        m = model_size({"path": str(setting)}, key, label)
    else:
        return Component(label, note=f"loaded ({why}) but its size is unknown: declare plan.{key}: "
                                     f"{{params: ..., dtype: ...}}")
    return frozen(label, m.params, m.dtype, shard if m.shard else 1, note=f"frozen, loaded for {why}")


def _folder_model(folder, where: str, key: str) -> ModelSize:
    if not folder or not Path(str(folder)).is_dir():
        raise FileNotFoundError(f"the plan needs the size of {where} ({folder!r} is not a folder here): declare "
                                f"it in the config, e.g. {key}: {{diffusers: QwenImageTransformer2DModel, dtype: "
                                f"bf16, shard: true}} or {{snapgen: {{preset: full}}}} or {{params: 2.0e9}}")
    return model_size({"path": str(folder)}, where, Path(str(folder)).name)


# --------------------------------------------------------------------------------------------- dmd / kdmd
def _plan_distill(cfg, plan, gpus, batch, res, text_len, act_bytes, gpu_memory) -> MemoryPlan:
    from ..nn.lora import add_lora, lora_parameters, set_adapter
    from .plan_models import _snapgen_model

    d = cfg.distill
    if "base" in plan:
        base_size = model_size(plan["base"], "plan.base", "base")
    else:
        base_size = _folder_model(cfg.model.get("init_from"), "model.init_from", "plan.base")
    if base_size.kind != "snapgen":
        raise ValueError("plan.base must describe a snapgen model (snapgen: {preset: ...} or path: a pipeline)")
    base = copy.deepcopy(_snapgen_model(base_size.spec)).requires_grad_(False)
    mcfg = base.config
    latent = (mcfg.in_channels, res[0] // mcfg.vae_factor, res[1] // mcfg.vae_factor)
    variants = list(d.get("variants", ["full"]))
    s_lora = d.get("student_lora", {"rank": 64, "alpha": 128})
    c_lora = d.get("critic_lora", {"rank": 64, "alpha": 128})
    prefix = d.get("adapter_prefix", cfg.task)
    notes = ["no gradient checkpointing: the distillation task trains without it"]
    comps = []
    few_rank = None
    if cfg.task == "kdmd":
        few_rank = _few_step_rank(d.get("few_step_teacher"), s_lora, notes)
        add_lora(base, "few_step_teacher", few_rank, 2.0 * few_rank)
    student_params = 0
    for v in variants:
        if s_lora:
            student_params += sum(p.numel() for p in add_lora(base, f"{prefix}_{v}", int(s_lora["rank"]),
                                                               float(s_lora["alpha"])))
    base.requires_grad_(False)
    base_params = sum(p.numel() for p in base.parameters()) - student_params
    teacher = model_size(plan["teacher"], "plan.teacher", "teacher") if "teacher" in plan else None
    role = ("students' host" if teacher is not None else "teacher, few-step teacher (LoRA) and students' host"
            if cfg.task == "kdmd" else "teacher and students' host")
    comps.append(frozen(f"base ({role})", base_params, "fp32", note="frozen fp32 (loaded as saved), replicated"))
    # held activations: each width's student (LoRA on, only LoRA trained) -- then its critic, same architecture
    acts = {}
    for v in variants:
        m = base
        if s_lora:
            for p in m.parameters():
                p.requires_grad_(False)
            set_adapter(m, f"{prefix}_{v}")
            for p in lora_parameters(m, f"{prefix}_{v}").values():
                p.requires_grad_(True)
        key = (base_size.spec, json.dumps(s_lora), prefix, cfg.task)
        acts[v] = student_component(m, res, text_len, batch, 1, False, act_bytes, [v], name="_", cache=_SAVED,
                                    key=key).held
    if s_lora:
        comps.append(trained(f"student LoRAs x{len(variants)}", student_params, held=sum(acts.values()),
                             note=f"rank {s_lora['rank']} per width ({', '.join(variants)}), EMA"))
    else:
        P = sum(p.numel() for p in base.parameters()) - student_params
        comps.append(trained(f"students (full copies) x{len(variants)}", P * len(variants), held=sum(acts.values()),
                             note="fully trained copies of the base, EMA"))
    critic_lora = 0
    if c_lora:
        probe = copy.deepcopy(_snapgen_model(base_size.spec))
        critic_lora = sum(p.numel() for p in add_lora(probe, "critic", int(c_lora["rank"]), float(c_lora["alpha"])))
    P0 = sum(p.numel() for p in _snapgen_model(base_size.spec).parameters())
    n = len(variants)
    if c_lora:
        comps.append(frozen(f"critics x{n} (copies of the base)", P0 * n, "fp32", note="frozen fp32 copies"))
        comps.append(trained(f"critic LoRAs x{n}", critic_lora * n, ema=False, held=sum(acts.values()),
                             note=f"rank {c_lora['rank']}, no EMA"))
    else:
        comps.append(trained(f"critics x{n} (full copies)", P0 * n, ema=False, held=sum(acts.values()),
                             note="fully trained copies of the base, no EMA"))
    # the teacher's forwards: CFG at 2x batch (real score), the few-step teacher at the batch (kdmd)
    if teacher is not None:
        notes.append(f"teacher sized from plan.teacher ({teacher.source}): the paper's; the trainer's {cfg.task} "
                     f"uses the base as teacher (tasks/dmd.py)")
        comps += _teacher_components(teacher, batch, gpus, latent, text_len, act_bytes, cfg=2)
        tw = teacher.feature_width or mcfg.width
    else:
        per, kept = base_size.working(latent, text_len)
        scale = act_bytes / 4
        held = kept * scale * batch if cfg.task == "kdmd" else 0.0
        comps.append(Component("teacher forwards (the base)", working=per * scale * 2 * batch, held=held,
                               note=f"CFG at batch {2 * batch}; weights in the base row"))
        tw = mcfg.width
    if cfg.task == "kdmd":
        ratios = dict(base.variants)
        p = sum(int(mcfg.width * ratios[v]) * tw + tw for v in variants)
        comps.append(trained(f"projectors x{n}", p, ema=False, note=f"Linear(width -> {tw}), no EMA"))
    comps.append(Component("text encoder (student)", note="not loaded: captions from data.cache"))
    comps.append(Component("VAE", note="not on the GPU (sample grids off)"))
    return MemoryPlan(gpus, "ddp", batch, comps, gpu_memory, notes)


def _few_step_rank(folder, s_lora, notes) -> int:
    """The few-step teacher's LoRA rank, from its adapter file's metadata when the folder is here; else the
    students' rank (noted)."""
    if folder and (Path(folder) / "pipeline.json").is_file():
        from safetensors import safe_open

        adapters = json.loads((Path(folder) / "pipeline.json").read_text()).get("adapters") or {}
        path = Path(folder) / "adapters" / f"{adapters.get('full', '')}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                return int(json.loads((f.metadata() or {}).get("rank", "64")))
    rank = int((s_lora or {}).get("rank", 64))
    notes.append(f"few-step teacher LoRA: rank {rank} assumed ({folder} is not here)")
    return rank
