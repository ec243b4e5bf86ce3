"""Trainer tasks for step distillation: ``dmd`` (plain DMD2) and ``kdmd`` (K-DMD, SnapGen++ Sec. 3.2).

One frozen base model serves every role that the paper gives to one backbone, switched by width and LoRA:

* teacher (real score): the base transformer at full width, no adapter, with CFG ``teacher_guidance``;
  or ``distill.teacher``: an external teacher (:mod:`snapgen.tasks.teachers`; e.g. a diffusers Qwen-Image /
  SD3 / Flux transformer with its own text encoders, the paper's setup), guided its own way;
* few-step teacher (``kdmd`` only): the base at full width with the few-step LoRA of a previous ``dmd``
  run switched on (the paper's Qwen-Image-Lightning = Qwen-Image + Lightning LoRA; no extra copy); or an
  external teacher (``few_step_teacher: {kind: diffusers, ...}``, e.g. a Lightning LoRA fused into its
  transformer and saved), whose feature width the projectors map to;
* student: the base at the student's width with its own LoRA ``<prefix>_<variant>`` (or a full copy when
  ``student_lora`` is null);
* critic (fake score): the student's base (same width) with its own LoRA, or a fully trained copy; trained
  at DMD2's uniform times (``distill.critic_times: uniform``, default) or at times drawn like the DMD term's tau
  (``tau``). A LoRA critic holds no copy of the base weights (the paper's "no extra copy", issue 21 §1): it is
  a module view whose frozen parameters and buffers *are* the base's tensors (:func:`shared_view`), so only its
  adapter is new memory; a fully trained critic (``critic_lora: null``) is a real copy.

``distill.variants`` lists the widths distilled in this one run (each step trains every listed width; their
LoRAs, critics and projectors are separate, so the widths do not interfere and share all settings -- the
paper's "no per-capacity tuning"). Only captions are read from the data cache: DMD is data-free. The critic
stays a LoRA copy of the student's base even with an external teacher: it must model the *student's*
distribution in the student's latent space (which must be the external teacher's: checked), and starting
from the student's base is closer to that than the teacher is.

Export: the base pipeline folder plus ``adapters/<name>.safetensors`` and a ``pipeline.json`` whose default
sampler is the few-step one (``few_step_times``, guidance 1) with ``adapters`` mapping variant -> adapter.

Trainer view: the transformer (student LoRAs, or full student copies) is trained, averaged and exported;
critics and projectors are trained only. Parameter groups ``generator`` (students + projectors) and
``critic`` are optimised and clipped separately (``optim.groups.<name>`` sets their lr, betas, clip). Data
parallel and gradient accumulation: each part takes its captions of the global batch
(:func:`snapgen.data.batches.part_indices`) and its rows of the global batch's noise
(:class:`snapgen.distill.dmd.BatchDraws`, replayed from the step's generator state), so any split computes
the step of one process.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..data.batches import part_indices, part_slice
from ..distill.dmd import BatchDraws
from ..distill.kdmd import CRITIC_TIMES, KDMDConfig, KDMDLoss
from ..nn.lora import add_lora, load_lora, set_adapter
from .base import ParamGroup, StepGenerator, Task, check_keys
from .registry import register_task

__all__ = ["DistillTask"]

_DISTILL_KEYS = {"variants", "student_lora", "critic_lora", "teacher_guidance", "few_step_teacher", "steps",
                 "shift", "gen_every", "weights", "tau", "adapter_prefix", "feat_loss", "teacher", "critic_times"}


def shared_view(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are ``model``'s own tensor objects (no new
    memory): new module objects, so adapters added to the view do not touch ``model``. Only for frozen use of
    the shared weights (the view's parameters must not be trained: they are the base's)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class _Role(nn.Module):
    """Calls a shared transformer as one role: a width and an adapter (``None`` = base weights)."""

    def __init__(self, model, variant: str, adapter: str | None):
        super().__init__()
        self.model, self.variant, self.adapter = model, variant, adapter

    def forward(self, x, t, cond=None, *, features=()):
        self.model.set_variant(self.variant)
        set_adapter(self.model, self.adapter)
        return self.model(x, t, cond, features=features)


@register_task("kdmd", kind="distill")
@register_task("dmd", kind="distill")
class DistillTask(Task):
    strategies = ("ddp",)  # FSDP of the shared frozen base + LoRAs is not supported (nor tested)

    def __init__(self, cfg, device: torch.device):
        from ..pipelines import TextToImagePipeline

        self.cfg, self.device = cfg, device
        d = dict(cfg.distill)
        check_keys("distill", d, _DISTILL_KEYS)
        check_keys("model", cfg.model, {"init_from"})
        check_keys("data", cfg.data, {"cache", "resolution"})
        check_keys("export", cfg.export, {"dtype"})
        if "init_from" not in cfg.model:
            raise ValueError("a distillation config needs model.init_from: the trained pipeline folder to distil")
        self.base_dir = Path(cfg.model["init_from"])
        pipe = TextToImagePipeline.from_pretrained(self.base_dir)
        self.pipe = pipe
        self.base = pipe.transformer.to(device)
        self.base.requires_grad_(False)
        # critics start from the base weights, without any adapter: a view of them (LoRA critics) or a copy
        clean = shared_view(self.base)
        self.conditioning = pipe.conditioning.to(device).eval().requires_grad_(False)
        self.variants = list(d.get("variants", ["full"]))
        for v in self.variants:
            if v not in self.base.variants:
                raise ValueError(f"distill.variants: {v!r} is not served by {self.base_dir} "
                                 f"(it serves {sorted(self.base.variants)})")
        w = d.get("weights", {})
        check_keys("distill.weights", w, {"dmd", "out", "feat"})
        tau = d.get("tau", [0.02, 0.98])
        critic_times = d.get("critic_times", "uniform")
        if critic_times not in CRITIC_TIMES:
            raise ValueError(f"distill.critic_times must be one of {list(CRITIC_TIMES)}, got {critic_times!r}")
        self.kcfg = KDMDConfig(steps=int(d.get("steps", 4)), shift=float(d.get("shift", 3.0)),
                               guidance=float(d.get("teacher_guidance", 4.0)), tau_low=float(tau[0]),
                               tau_high=float(tau[1]), gen_every=int(d.get("gen_every", 5)),
                               dmd_weight=float(w.get("dmd", 1.0)), out_weight=float(w.get("out", 1.0)),
                               feat_weight=float(w.get("feat", 1.0)), feat_loss=str(d.get("feat_loss", "mse")),
                               critic_times=critic_times, seed=cfg.seed)
        self.prefix = d.get("adapter_prefix", cfg.task)
        # external teachers (their own text side) for the real score and/or the few-step knowledge terms
        self.ext_teacher = self._external(d.get("teacher"), "distill.teacher")
        # few-step teacher: the base with a LoRA from a previous dmd run (K-DMD only), or an external one
        self.few_step, self.ext_few_step = None, None
        if cfg.task == "kdmd":
            src = d.get("few_step_teacher")
            if not src:
                raise ValueError("task kdmd needs distill.few_step_teacher: a pipeline folder from a dmd run "
                                 "(its full-width adapter is the few-step teacher), or {kind: diffusers, ...}; "
                                 "use task dmd for plain DMD")
            if isinstance(src, dict):
                self.ext_few_step = self._external(src, "distill.few_step_teacher")
                self.few_step = self.ext_few_step
            else:
                adapter_file = self._few_step_adapter_file(Path(src))
                load_lora(self.base, adapter_file, name="few_step_teacher")
                self.base.requires_grad_(False)
                self.few_step = _Role(self.base, "full", "few_step_teacher")
        self.teacher = self.ext_teacher if self.ext_teacher is not None else _Role(self.base, "full", None)
        s_lora, c_lora = d.get("student_lora", {"rank": 64, "alpha": 128}), d.get("critic_lora", {"rank": 64, "alpha": 128})
        self.students, self.critics, self.projectors, self.losses = {}, nn.ModuleDict(), nn.ModuleDict(), {}
        self.student_copies = nn.ModuleDict()
        for v in self.variants:
            name = f"{self.prefix}_{v}"
            if s_lora:
                add_lora(self.base, name, int(s_lora["rank"]), float(s_lora["alpha"]))
                student = _Role(self.base, v, name)
            else:  # full fine-tuning: an own copy of the weights
                copy_ = copy.deepcopy(self.base).requires_grad_(True)
                self.student_copies[v] = copy_
                student = _Role(copy_, v, None)
            if c_lora:   # frozen shared base weights + the critic's own adapter
                critic_model = shared_view(clean)
            else:        # fully trained critic: its own copy of the weights
                critic_model = copy.deepcopy(clean).requires_grad_(True)
            if c_lora:
                add_lora(critic_model, "critic", int(c_lora["rank"]), float(c_lora["alpha"]))
            self.critics[v] = critic_model
            critic = _Role(critic_model, v, "critic" if c_lora else None)
            projector = None
            if self.few_step is not None:
                width = int(self.base.config.width * self.base.variants[v])
                out = self.ext_few_step.feature_width if self.ext_few_step is not None else self.base.config.width
                projector = nn.Linear(width, out)
                self.projectors[v] = projector
            self.students[v] = student
            self.losses[v] = KDMDLoss(self.kcfg, student, critic, self.teacher, self.few_step, projector)
        self.critics.to(device)
        self.projectors.to(device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._replay = StepGenerator(self.generator)

    def _external(self, spec, where: str):
        """An external teacher from a config value (None: none), in the student base's latent space."""
        if spec is None:
            return None
        from .teachers import build_teacher

        return build_teacher(spec, self.device, where=where, encoder_dims=self.conditioning.encoder_dims,
                             student_channels=self.base.config.in_channels, student_patch=self.base.config.patch_size,
                             student_vae=self.base_dir / "vae")

    @staticmethod
    def _few_step_adapter_file(folder: Path) -> Path:
        meta = folder / "pipeline.json"
        if not meta.is_file():
            raise FileNotFoundError(f"few-step teacher {folder} is not a pipeline folder (no pipeline.json)")
        adapters = json.loads(meta.read_text()).get("adapters") or {}
        if "full" not in adapters:
            raise ValueError(f"few-step teacher {folder} has no full-width adapter (adapters: {adapters}); "
                             f"distil it with task dmd and variants [full]")
        return folder / "adapters" / f"{adapters['full']}.safetensors"

    # --- trainer interface ----------------------------------------------------------------------------
    def modules(self) -> dict:
        student = frozenset({"trained", "ema", "exported"})
        mods = {"transformer": (self.base, student), "critics": (self.critics, frozenset({"trained"})),
                "projectors": (self.projectors, frozenset({"trained"}))}
        if len(self.student_copies):
            mods["students"] = (self.student_copies, student)
        return mods

    def param_groups(self) -> list[ParamGroup]:
        gen = ("transformer", "projectors") + (("students",) if len(self.student_copies) else ())
        return [ParamGroup("generator", gen), ParamGroup("critic", ("critics",))]

    def prepare(self, run_dir: Path) -> None:
        from ..data.latent_cache import check_cache_encoders, load_latent_cache
        from ..text import text_specs

        path = self.cfg.data.get("cache")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"data.cache {path!r} not found: distillation reads the captions of a flow "
                                    f"run's latent cache (train the base model first, or point data.cache at it)")
        cache = load_latent_cache(path)
        check_cache_encoders(cache, path, *text_specs(self.pipe.config.text_encoder, self.pipe.config.text_max_length))
        self.text_features = cache["text_features"]
        self.text_tokens, self.text_mask = self.text_features[0]
        self.caption_index = cache["caption_index"]
        self.captions = cache["captions"]
        for teacher in (self.ext_teacher, self.ext_few_step):
            if teacher is not None and teacher.needs_captions:
                if len(self.captions) != len(self.text_tokens):
                    raise ValueError(f"data.cache {path} stores {len(self.captions)} caption strings for "
                                     f"{len(self.text_tokens)} captions; an external teacher encodes caption "
                                     f"strings with its own text encoder: rebuild the cache")
                teacher.prepare_captions(self.captions)
        res = self.cfg.data.get("resolution", self.pipe.config.resolution[0])
        f = self.pipe.vae_factor
        self.latent_shape = (self.base.config.in_channels, res // f, res // f)

    def _condition(self, step: int, part: int = 0):
        from ..data.latent_cache import cache_features

        idx = torch.from_numpy(part_indices(self.cfg.seed, step, len(self.caption_index), self.cfg.batch_size,
                                            part, self.parts))
        cap = self.caption_index[idx]
        feats = cache_features(self.text_features, cap, self.device)
        B = len(idx)
        keep = [torch.zeros(B, dtype=torch.bool)] * len(feats)
        with torch.no_grad():
            text, mask = self.conditioning(feats, drop=keep)
            null, null_mask = self.conditioning.null(B, lengths=[tokens.shape[1] for tokens, _ in feats])
            # external teachers: their own conditioning of the same captions (None: the student's is used)
            extra, captions = {}, [self.captions[i] for i in cap.tolist()] if self.captions else None
            if self.ext_teacher is not None:
                tc = self.ext_teacher.condition(captions, feats, keep)
                extra.update(teacher_cond=tc, teacher_uncond=self.ext_teacher.null_condition(B, tc))
            if self.ext_few_step is not None:
                extra["few_step_cond"] = self.ext_few_step.condition(captions, feats, keep)
        return {"text": text, "text_mask": mask}, {"text": null, "text_mask": null_mask}, extra

    def loss(self, step: int, part: int = 0):
        B = self.cfg.batch_size
        draws = BatchDraws(self._replay.begin(step), B * self.parts, part_slice(part, self.parts, B))
        cond, uncond, extra = self._condition(step, part)
        total, logs = 0.0, {}
        for v, objective in self.losses.items():
            loss, metrics = objective(step, cond, uncond, (len(cond["text"]), *self.latent_shape), draws,
                                      self.device, **extra)
            total = total + loss
            logs.update({f"{k}_{v}": val for k, val in metrics.items() if k != "k"})
        self.base.set_variant("full")
        set_adapter(self.base, None)
        return total, logs

    # --- samples / export -----------------------------------------------------------------------------
    def adapter_names(self) -> dict[str, str]:
        return {v: f"{self.prefix}_{v}" for v in self.variants}

    @torch.no_grad()
    def sample(self, path: Path, step: int) -> None:
        from ..utils.images import make_grid

        prompts = (self.cfg.sampling or {}).get("prompts") or []
        if not prompts or len(self.student_copies):
            return
        pipe = self._export_pipeline()
        images, captions = [], []
        try:
            for v in self.variants:
                images += pipe.set_variant(v)(prompts, seed=0)
                captions += [f"{v}: {p}" for p in prompts]
        finally:  # back to the base state (the roles set width and adapter on every call anyway); not through
            # the pipeline, which refuses a width without an adapter -- e.g. "full" when only tiny/small are distilled
            self.base.set_variant("full")
            set_adapter(self.base, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, captions, cols=len(prompts), scale=2).save(path)

    def _export_pipeline(self):
        from ..pipelines import TextToImagePipeline
        from ..sampling import make_sampler

        # the few-step sampler that K-DMD trained (its grid stored explicitly), the base sampler kept for use_base()
        sampler = self.kcfg.sampler_config()
        times = tuple(float(t) for t in make_sampler(sampler).times())
        config = (self.pipe.config.with_sampler(sampler.replace(times=times))
                  .with_base_sampler(self.pipe.config.sampler_config().replace(times=()))
                  .replace(adapters=self.adapter_names()))
        return TextToImagePipeline(self.base, self.conditioning, self.pipe.vae, config,
                                   text_encoder=self.pipe._text_encoder)

    def export(self, out_dir: Path) -> Path:
        if len(self.student_copies):
            raise NotImplementedError("export of fully fine-tuned students: use LoRA students (student_lora)")
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        dtype = {"float32": torch.float32, "float16": torch.float16}[self.cfg.export.get("dtype", "float32")]
        # base weights (adapters are never part of the transformer file) + the students' adapters beside them
        self._export_pipeline().save_pretrained(out_dir, dtype=dtype)
        print(f"distilled pipeline exported to {out_dir} (adapters: {self.adapter_names()})")
        return out_dir
