"""The memory plan of a whole training config (``snapgen plan``): what each task holds on one GPU, read from
the trainer's behaviour (``snapgen.train.trainer``, ``snapgen.train.distributed``, ``snapgen.tasks``).

``flow`` (stages 1-2 of the paper recipe), in the order a step runs them:

1. with a ``kd:`` section, the frozen teacher (SnapGen++ Sec. 3.1; :mod:`snapgen.tasks.teachers`): weights in
   the dtype it is loaded in, replicated on every rank (the trainer shards trained modules only); the working
   set of its no-grad forward at the per-GPU batch; its targets (velocity + last-block features, fp32) held
   until the backward. An external (diffusers) teacher has its own text encoder: it encodes the cached
   captions in ``prepare`` and is unloaded (counted as a working set before training), but with streamed
   shards it encodes each new caption as it comes and stays loaded (counted as weights);
2. the student: fp32 master weights, gradients, AdamW and EMA (divided over the ranks with FSDP2) and the
   activations of every width of the step (:func:`snapgen.train.plan.student_component`); the text
   conditioning and the KD projectors (trained; projectors without EMA); FSDP's gathered parameters in the
   compute dtype (two blocks when blocks reshard after forward, every block when an elastic step keeps them
   gathered: ``distributed.reshard_after_forward``);
3. the student's text encoder and the VAE: only when the run loads them (sample grids, or a latent cache the
   run builds itself).

``dmd`` / ``kdmd`` (stage 3; DDP only): the frozen base at ``model.init_from`` (fp32, with its text
conditioning) hosts each width's student LoRA (trained, EMA) and, for kdmd, the few-step teacher's LoRA; one
critic per width is its own trained LoRA on a view of that same base (no copy of the weights; a fully trained
critic, ``critic_lora: null``, is a full fp32 copy); projectors per width (kdmd). Held:
every width's student and critic activations (one backward for all widths; the distillation task has no
gradient checkpointing); working: the real-score teacher with CFG (2x batch) -- the base itself, or
``distill.teacher`` (external, replicated, its text encoder used in ``prepare`` only).

Activations are bf16 under ``precision: bf16`` (autocast with DDP, FSDP2's MixedPrecisionPolicy with FSDP).
The weights autograd saves for backward count as activation memory only as autocast's bf16 copies (DDP);
under FSDP they are the gathered parameters. Sizes of models that are not on this machine come from the
config's ``plan:`` section (:mod:`snapgen.train.plan_models`); a missing size is an error naming the key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .plan import DTYPE_BYTES, Component, GiB, MemoryPlan, frozen, largest_block_params, student_component, trained
from .plan_models import ModelSize, model_size

WARM_START_KEYS = ("init_from", "sort_by_importance")  # model: keys of the flow task's warm start, not the config

__all__ = ["plan_config", "widths_per_step"]

_PLAN_KEYS = {"teacher", "few_step_teacher", "base", "text_encoder", "vae"}
_SAVED: dict = {}  # per-sample activation measurements, reused by the plans of other GPU counts / batches
_RUN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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
    plan = dict(cfg.plan or {})
    unknown = sorted(set(plan) - _PLAN_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in plan:; valid: {sorted(_PLAN_KEYS)}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if not text_len:  # several encoders: their token sequences are concatenated
        from ..text import text_specs

        ml = cfg.text.get("max_length", 300)
        text_len = sum(text_specs(cfg.text.get("encoder", "minilm"), ml if isinstance(ml, list) else int(ml))[1])
    text_len = int(text_len)
    batch = int(batch_per_gpu or cfg.batch_size)
    res = resolution or cfg.data.get("resolution", 256)
    res = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
    strategy = strategy or cfg.distributed.get("strategy", "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if cfg.task == "flow":
        return _plan_flow(cfg, plan, gpus, batch, strategy, res, text_len, gpu_memory)
    if cfg.task in ("dmd", "kdmd"):
        if strategy != "ddp":
            raise ValueError(f"task {cfg.task} trains with DDP only (tasks/dmd.py: strategies = ('ddp',))")
        return _plan_distill(cfg, plan, gpus, batch, res, text_len, gpu_memory)
    raise ValueError(f"snapgen plan covers the flow, dmd and kdmd tasks; {cfg.task!r} is not one of them")


# ---------------------------------------------------------------------------------------------- teachers
def _teacher_size(spec, plan: dict, key: str, where: str) -> ModelSize:
    """A teacher's size: ``plan.<key>`` when declared, else the run's folder when it is here; the dtype is the
    one the trainer loads it in (``plan.<key>.dtype`` / ``shard`` are what-if overrides, marked as such)."""
    if isinstance(spec, (str, Path)):
        spec = {"kind": "snapgen", "path": str(spec)}
    kind = spec.get("kind", "snapgen")
    dtype = _RUN_DTYPES.get(spec.get("dtype", "float32"), "fp32") if kind == "diffusers" else "fp32"
    if key in plan:
        desc = dict(plan[key])
        what_if = sorted(k for k in ("dtype", "shard") if k in desc)
        size = model_size({"dtype": dtype, **desc}, f"plan.{key}", "teacher")
        size.source += f" (what-if: plan.{key}.{', '.join(what_if)})" if what_if else ""
        return size
    folder = Path(str(spec.get("transformer") or Path(spec.get("path") or "") / "transformer")) \
        if kind == "diffusers" else Path(str(spec.get("path") or ""))
    if not spec.get("path") and not spec.get("transformer") or not folder.is_dir():
        raise FileNotFoundError(f"the plan needs the size of {where} ({folder} is not here): declare it as "
                                f"plan.{key}, e.g. {{diffusers: QwenImageTransformer2DModel, text_encoder: {{params: "
                                f"8.29e9}}}}, {{snapgen: {{preset: full}}}} or {{params: 2.0e9}}")
    desc = {"path": str(folder), "dtype": dtype, "name": Path(str(spec.get("path") or folder)).name}
    if kind == "diffusers":
        from .plan_models import safetensors_params

        root = Path(spec["path"]) if spec.get("path") else None
        enc = [Path(str(spec[k])) for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if spec.get(k)] or \
            ([d for d in sorted(root.glob("text_encoder*")) if d.is_dir()] if root else [])
        if enc:
            desc["text_encoder"] = {"params": sum(safetensors_params(d) for d in enc),
                                    "name": "+".join(d.name for d in enc)}
    return model_size(desc, where, "teacher")


def _teacher_rows(t: ModelSize, batch: int, gpus: int, latent, text_len: int, autocast: bool, cfg_batch: int,
                  encoder_resident: bool, label: str = "teacher") -> tuple[list[Component], list[Component]]:
    """``(text encoder rows, teacher rows)`` of a frozen teacher: its text encoder (resident, or loaded in
    ``prepare`` only: then its weights are a working set before training, to be listed first), and the teacher
    with the working set of a forward at ``cfg_batch x batch`` and its fp32 targets held at ``batch``."""
    rows = []
    if t.text_encoder is not None:
        e = t.text_encoder  # loaded in the teacher's dtype (distill/diffusers_teacher.py)
        bytes_ = DTYPE_BYTES[t.dtype] * e.params / (gpus if e.shard else 1)
        if encoder_resident:
            rows.append(frozen(f"{label} text encoder ({e.name})", e.params, t.dtype, gpus if e.shard else 1,
                               note="loaded by the first new caption (streamed shards) and kept"))
        else:
            rows.append(Component(f"{label} text encoder ({e.name})", e.params, t.dtype, working=bytes_,
                                  note="in prepare only: encodes the cached captions, then unloaded"))
    per, kept = t.working(latent, text_len)
    # an fp32 model computes in bf16 under autocast; a diffusers teacher returns fp32 targets (.float())
    scale = 0.5 if autocast and t.dtype == "fp32" else 1.0
    kept_scale = 4 / DTYPE_BYTES[t.dtype] if t.kind == "diffusers" else scale
    shard = gpus if t.shard else 1
    gathered = 2 * t.largest_block * DTYPE_BYTES[t.dtype] if shard > 1 else 0
    note = f"frozen, {'sharded over ' + str(gpus) + ' (what-if)' if shard > 1 else 'replicated'}"
    note += f", forward at batch {cfg_batch * batch}" if per else ", forward not measured (size by params)"
    teacher = frozen(f"{label} ({t.name})", t.params, t.dtype, shard, held=kept * kept_scale * batch,
                     working=per * scale * cfg_batch * batch + gathered, note=note)
    return rows, [teacher]


# ------------------------------------------------------------------------------------------------------ flow
def _plan_flow(cfg, plan, gpus, batch, strategy, res, text_len, gpu_memory) -> MemoryPlan:
    from ..models import build_model

    fsdp = strategy == "fsdp" and gpus > 1
    shard = gpus if fsdp else 1
    bf16 = cfg.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    autocast = bf16 and not fsdp  # DDP / one process on CUDA: autocast; FSDP: MixedPrecisionPolicy
    with torch.device("meta"):
        model = build_model({k: v for k, v in cfg.model.items() if k not in WARM_START_KEYS})
    mcfg = model.config
    widths = widths_per_step(mcfg, cfg.elastic)
    latent = (mcfg.in_channels, res[0] // mcfg.vae_factor, res[1] // mcfg.vae_factor)
    comps, notes = [], []
    teacher = None
    if cfg.kd:
        teacher = _teacher_size(cfg.kd.get("teacher"), plan, "teacher", "kd.teacher")
        enc, rows = _teacher_rows(teacher, batch, gpus, latent, text_len, autocast, 1,
                                  encoder_resident=bool(cfg.data.get("shards")))
        comps += enc + rows  # the teacher's forward runs first in the step (flow_kd.py)
    key = json.dumps({k: v for k, v in cfg.model.items() if k not in WARM_START_KEYS}, sort_keys=True)
    comps.append(student_component(model, res, text_len, batch, shard, cfg.grad_checkpointing, act_bytes, widths,
                                   cache=_SAVED, key=key, parameters=autocast))
    comps.append(_conditioning(cfg, mcfg, shard, notes))
    if teacher is not None:
        tw = teacher.feature_width or 0
        if not tw:
            notes.append("KD projectors not counted: the teacher's feature width is unknown (size it by class)")
        ratios = dict(model.variants)
        p = sum(int(mcfg.width * ratios[w]) * tw + tw for w in ratios) if tw else 0
        tokens = (latent[1] // mcfg.patch_size) * (latent[2] // mcfg.patch_size)
        held = sum(batch * tokens * int(mcfg.width * ratios[w]) * act_bytes for w in widths) if tw else 0.0
        comps.append(trained("KD projectors", p, shard, ema=False, held=held,
                             note=f"Linear(width -> {tw}) per width, no EMA"))
    if fsdp:
        comps.append(_gathered(model, cfg, len(widths), act_bytes))
    online = bool(cfg.sampling.get("prompts")) or ("spec" in cfg.data and not cfg.data.get("shards"))
    why = "sample grids / the run builds its latent cache" if online else ""
    comps.append(_encoder(plan, "text_encoder", "text encoder (student)", cfg.text.get("encoder", "minilm"), online,
                          why, "caption features precomputed", shard))
    comps.append(_encoder(plan, "vae", "VAE", cfg.vae.get("path"), online, why, "latents precomputed", shard))
    return MemoryPlan(gpus, strategy, batch, comps, gpu_memory, notes)


def _gathered(model, cfg, widths: int, act_bytes: int) -> Component:
    """FSDP2's unsharded parameters in the compute dtype (``snapgen.train.distributed.reshard_after_forward``):
    roots stay gathered (``auto``); blocks reshard after forward (current + prefetched block) unless several
    widths run per step (then every block stays gathered until its backward)."""
    from .distributed import reshard_after_forward

    root, blocks = reshard_after_forward(cfg.distributed.get("reshard_after_forward", "auto"), widths)
    all_blocks = [*model.down_blocks, *model.middle_blocks, *model.up_blocks]
    in_blocks = sum(p.numel() for b in all_blocks for p in b.parameters())
    roots = sum(p.numel() for p in model.parameters()) - in_blocks
    n = (2 * largest_block_params(model) if blocks else in_blocks) + (0 if root else roots)
    how = "two blocks" if blocks else "every block (several widths per step)"
    return Component("FSDP gathered parameters", n, "bf16" if act_bytes == 2 else "fp32", working=n * act_bytes,
                     note=f"unsharded: {how}{'' if root else ' + the root module'}")


def _conditioning(cfg, mcfg, shard, notes) -> Component:
    """The trained text conditioning (``snapgen.text.TextConditioning``): per encoder its null embedding, and a
    projection when the encoder's width is not the model's ``text_dim`` (always with several encoders). The
    widths as ``FlowTask`` infers them."""
    spec = cfg.text.get("encoder", "minilm")
    specs = [spec] if isinstance(spec, str) else list(spec)
    p = 0
    for s in specs:
        dim = _encoder_width(s, mcfg, notes)
        p += dim + (0 if dim == mcfg.text_dim and len(specs) == 1 else dim * mcfg.text_dim + mcfg.text_dim)
    what = "null embedding" if len(specs) == 1 else f"{len(specs)} null embeddings"
    return trained("text conditioning", p, shard, note=f"{what}{' + projection' if p > dim else ''}"
                   f"{'s' if p > dim and len(specs) > 1 else ''}")


def _encoder_width(spec, mcfg, notes) -> int:
    dim = 384 if spec in ("minilm", "paraphrase-minilm-l3") else None
    if dim is None and (Path(str(spec)) / "config.json").is_file():
        c = json.loads((Path(str(spec)) / "config.json").read_text())
        c = c.get("text_config", c)
        dim = next((int(c[k]) for k in ("hidden_size", "d_model", "dim") if k in c), None)
    if dim is None:
        dim = mcfg.text_dim
        notes.append(f"text encoder {spec} is not here: its width is taken as the model's text_dim ({dim})")
    return dim


def _encoder(plan, key, label, setting, online, why, offline_note, shard) -> Component:
    """The student's text encoder / the VAE: counted only when the run loads it."""
    if not online:
        return Component(label, note=f"not loaded: {offline_note}")
    if isinstance(setting, (list, tuple)) and key not in plan:  # several text encoders: all loaded, sizes add up
        parts = [_encoder(plan, key, label, s, online, why, offline_note, shard) for s in setting]
        unknown = [s for s, c in zip(setting, parts) if not c.params]
        if unknown:
            return Component(label, note=f"loaded ({why}) but the size of encoder {unknown[0]!r} is unknown: "
                                         f"declare plan.{key}: {{params: <all {len(setting)} encoders together>, "
                                         f"dtype: ...}}")
        return Component(label, sum(c.params for c in parts), parts[0].dtype, sum(c.weights for c in parts),
                         note=f"frozen, {len(parts)} encoders, loaded for {why}")
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


# --------------------------------------------------------------------------------------------- dmd / kdmd
def _plan_distill(cfg, plan, gpus, batch, res, text_len, gpu_memory) -> MemoryPlan:
    from ..nn.lora import add_lora, lora_parameters, set_adapter
    from .plan_models import _snapgen_model

    d = cfg.distill
    bf16 = cfg.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    if "base" in plan:
        base_size = model_size(plan["base"], "plan.base", "base")
    else:
        folder = cfg.model.get("init_from")
        if not folder or not Path(str(folder)).is_dir():
            raise FileNotFoundError(f"the plan needs the size of model.init_from ({folder!r} is not here): declare "
                                    f"it as plan.base, e.g. {{snapgen: {{preset: full}}}}")
        base_size = model_size({"path": str(folder)}, "model.init_from", "base")
    if base_size.kind != "snapgen":
        raise ValueError("plan.base must describe a snapgen model (snapgen: {preset: ...} or path: a pipeline)")
    base = copy.deepcopy(_snapgen_model(base_size.spec)).requires_grad_(False)
    mcfg = base.config
    latent = (mcfg.in_channels, res[0] // mcfg.vae_factor, res[1] // mcfg.vae_factor)
    variants = list(d.get("variants", ["full"]))
    n = len(variants)
    s_lora = d.get("student_lora", {"rank": 64, "alpha": 128})
    c_lora = d.get("critic_lora", {"rank": 64, "alpha": 128})
    prefix = d.get("adapter_prefix", cfg.task)
    notes = ["no gradient checkpointing: the distillation task trains without it"]
    few = d.get("few_step_teacher") if cfg.task == "kdmd" else None
    ext_few = _teacher_size(few, plan, "few_step_teacher", "distill.few_step_teacher") \
        if isinstance(few, dict) else None
    if few and ext_few is None:
        rank = _few_step_rank(few, s_lora, notes)
        add_lora(base, "few_step_teacher", rank, 2.0 * rank)
    student_params = 0
    if s_lora:
        for v in variants:
            student_params += sum(p.numel() for p in add_lora(base, f"{prefix}_{v}", int(s_lora["rank"]),
                                                               float(s_lora["alpha"])))
    base.requires_grad_(False)
    teacher = _teacher_size(d["teacher"], plan, "teacher", "distill.teacher") if d.get("teacher") else None
    roles = [r for r, on in (("teacher", teacher is None), ("few-step teacher (LoRA)", few and ext_few is None),
                             ("students' host", True)) if on]
    P0 = sum(p.numel() for p in _snapgen_model(base_size.spec).parameters())
    conditioning = base_size.params - P0  # the pipeline's text conditioning, when sized from its folder
    comps = [frozen(f"base ({', '.join(roles)})", sum(p.numel() for p in base.parameters()) - student_params
                    + conditioning, "fp32", note="frozen fp32 (loaded as saved) + text conditioning, replicated")]
    acts = {}  # each width's student activations (LoRA on, only LoRA trained); its critic has the same
    for v in variants:
        if s_lora:
            set_adapter(base, f"{prefix}_{v}")
            for p in lora_parameters(base, f"{prefix}_{v}").values():
                p.requires_grad_(True)
        key = (base_size.spec, json.dumps(s_lora), prefix, cfg.task)
        acts[v] = student_component(base, res, text_len, batch, 1, False, act_bytes, [v], name="_", cache=_SAVED,
                                    key=key, parameters=bf16).held
        base.requires_grad_(False)
    if s_lora:
        comps.append(trained(f"student LoRAs x{n}", student_params, held=sum(acts.values()),
                             note=f"rank {s_lora['rank']} per width ({', '.join(variants)}), EMA"))
    else:
        comps.append(trained(f"students (full copies) x{n}", P0 * n, held=sum(acts.values()),
                             note="fully trained copies of the base, EMA"))
    if c_lora:
        probe = copy.deepcopy(_snapgen_model(base_size.spec))
        r = sum(p.numel() for p in add_lora(probe, "critic", int(c_lora["rank"]), float(c_lora["alpha"])))
        comps.append(trained(f"critic LoRAs x{n}", r * n, ema=False, held=sum(acts.values()),
                             note=f"rank {c_lora['rank']} on the shared base (no copy), no EMA"))
    else:
        comps.append(trained(f"critics x{n} (full copies)", P0 * n, ema=False, held=sum(acts.values()),
                             note="fully trained copies of the base, no EMA"))
    # the teachers' forwards: the real score with CFG at 2x batch; the few-step teacher at the batch (kdmd)
    if teacher is not None:
        enc, rows = _teacher_rows(teacher, batch, gpus, latent, text_len, bf16, 2, encoder_resident=False)
        rows[0].held = 0.0  # the real score is a velocity (latent-sized), not features
        comps = enc + comps + rows  # its text encoder runs in prepare, before anything is held
    else:
        per, _ = base_size.working(latent, text_len)
        comps.append(Component("teacher forwards (the base)", working=per * act_bytes / 4 * 2 * batch,
                               note=f"CFG at batch {2 * batch}; weights in the base row"))
    if ext_few is not None:
        enc, rows = _teacher_rows(ext_few, batch, gpus, latent, text_len, bf16, 1, encoder_resident=False,
                                  label="few-step teacher")
        comps = enc + comps + rows
    elif few:
        _, kept = base_size.working(latent, text_len)
        comps.append(Component("few-step teacher targets", held=kept * act_bytes / 4 * batch,
                               note="the base + its LoRA: velocity and last-block features"))
    if cfg.task == "kdmd":
        out = ext_few.feature_width if ext_few is not None else mcfg.width
        ratios = dict(base.variants)
        p = sum(int(mcfg.width * ratios[v]) * out + out for v in variants)
        comps.append(trained(f"projectors x{n}", p, ema=False, note=f"Linear(width -> {out}), no EMA"))
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
