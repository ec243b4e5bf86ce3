"""What is trained: each task builds its modules, yields a loss per step, writes samples and exports.

- ``autoencoder``: the small VAE on images (random crops; L1 + KL), exported with measured latent
  scale/shift and its held-out PSNR.
- ``flow``: the text-to-image three-stage DiT by flow matching on a latent cache (images encoded once by
  the autoencoder, captions once by the frozen text encoder), exported as a pipeline folder.

Batches are a pure function of ``(seed, step)``, so resuming needs no data-loader state.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.base import image_to_tensor
from .config import TrainConfig

__all__ = ["build_task", "AutoencoderTask", "FlowTask", "batch_indices", "psnr"]


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Items of step ``step``: consecutive slices of a fresh permutation per epoch (all items once per epoch)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = _permutation(seed, epoch, n)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
    return np.asarray(out)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 7919, epoch]).permutation(n)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = (x.clamp(-1, 1) - y.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def build_task(cfg: TrainConfig, device: torch.device):
    if cfg.task == "autoencoder":
        return AutoencoderTask(cfg, device)
    if cfg.task == "flow":
        return FlowTask(cfg, device)
    if cfg.task in ("dmd", "kdmd"):
        from ..distill.task import DistillTask

        return DistillTask(cfg, device)
    raise ValueError(f"unknown task {cfg.task!r}")


def _check_keys(section: str, d: dict, allowed: set[str]) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ValueError(f"unknown keys in '{section}': {bad}; valid: {sorted(allowed)}")


# ======================================================================================================
class AutoencoderTask:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..data.mixed import build_dataset
        from ..vae import Autoencoder, AutoencoderConfig

        self.cfg, self.device = cfg, device
        _check_keys("data", cfg.data, {"spec", "eval_spec", "crop", "eval_count"})
        _check_keys("loss", cfg.loss, {"kl_weight", "mse_weight", "l1_weight"})
        model_kw = dict(cfg.model)
        init_from = model_kw.pop("init_from", None)
        self.freeze_encoder = bool(model_kw.pop("freeze_encoder", False))
        self.vae = Autoencoder(AutoencoderConfig(**model_kw)).to(device)
        if init_from:  # e.g. a tiny decoder trained against a frozen, already trained encoder
            src = Autoencoder.from_pretrained(init_from)
            self.vae.encoder.load_state_dict(src.encoder.state_dict())
        if self.freeze_encoder:
            self.vae.encoder.requires_grad_(False)
        if "spec" not in cfg.data:
            raise ValueError("autoencoder task needs data.spec (a dataset spec, see snapgen.data.build_dataset)")
        self.dataset = build_dataset(cfg.data["spec"])
        self.eval_dataset = build_dataset(cfg.data["eval_spec"]) if cfg.data.get("eval_spec") else None
        self.crop = int(cfg.data.get("crop", 0))
        self.kl_weight = float(cfg.loss.get("kl_weight", 1e-6))
        self.l1_weight = float(cfg.loss.get("l1_weight", 1.0))
        self.mse_weight = float(cfg.loss.get("mse_weight", 1.0))
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def trainable_modules(self) -> dict:
        return {"vae": self.vae}

    def prepare(self, run_dir: Path) -> None:
        pass

    def _images(self, idx) -> torch.Tensor:
        return torch.stack([image_to_tensor(self.dataset[int(i)].image) for i in idx])

    def loss(self, step: int):
        idx = batch_indices(self.cfg.seed, step, len(self.dataset), self.cfg.batch_size)
        x = self._images(idx)
        if self.crop:
            H, W = x.shape[-2:]
            rng = np.random.default_rng([self.cfg.seed, 104729, step])
            ys, xs = rng.integers(0, H - self.crop + 1, len(x)), rng.integers(0, W - self.crop + 1, len(x))
            x = torch.stack([im[:, a:a + self.crop, b:b + self.crop] for im, a, b in zip(x, ys, xs)])
        x = x.to(self.device)
        rec, post = self.vae(x, sample=True, generator=self.generator)
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = self.l1_weight * l1 + self.mse_weight * mse + self.kl_weight * kl
        return loss, {"loss_l1": l1.item(), "loss_kl": kl.item(),
                      "psnr": float(10 * math.log10(4.0 / max(mse.item(), 1e-12)))}

    def _eval_images(self, n: int) -> torch.Tensor:
        ds = self.eval_dataset or self.dataset
        n = min(n, len(ds))
        step = max(1, len(ds) // n)
        return torch.stack([image_to_tensor(ds[i * step].image) for i in range(n)])

    @torch.no_grad()
    def sample(self, path: Path, step: int) -> None:
        from ..data.base import tensor_to_image
        from ..pipelines.text_to_image import make_grid

        x = self._eval_images(8).to(self.device)
        rec = self.vae(x, sample=False)[0]
        ims = [tensor_to_image(t) for t in torch.cat([x, rec]).cpu()]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(ims, cols=8, scale=2).save(path)

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        n = n or int(self.cfg.data.get("eval_count", 256))
        x = self._eval_images(n)
        vals = []
        for chunk in x.split(64):
            chunk = chunk.to(self.device)
            vals.append(psnr(self.vae(chunk, sample=False)[0], chunk).cpu())
        v = torch.cat(vals)
        return {"psnr_mean": round(float(v.mean()), 3), "psnr_min": round(float(v.min()), 3), "images": len(v),
                "eval_set": "eval_spec" if self.eval_dataset is not None else "training data"}

    @torch.no_grad()
    def latent_stats(self, n: int = 512) -> tuple[float, float]:
        idx = batch_indices(self.cfg.seed + 1, 0, len(self.dataset), min(n, len(self.dataset)))
        zs = [self.vae.encode(self._images(chunk).to(self.device)).mode() for chunk in np.array_split(idx, 8)]
        z = torch.cat(zs)
        return float(z.mean()), float(z.std())

    def export(self, out_dir: Path) -> Path:
        mean, std = self.latent_stats()
        cfg = self.vae.config.replace(shift_factor=round(mean, 6), scaling_factor=round(1.0 / std, 6))
        self.vae.config = cfg  # the exported config carries the normalisation
        self.vae.save_pretrained(out_dir)
        report = {"latent_mean": mean, "latent_std": std, **self.evaluate()}
        (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"autoencoder exported to {out_dir}: {report}")
        return Path(out_dir)


@torch.no_grad()
def validation_loss(model, conditioning, cache: dict, variant: str | None = None, objective=None,
                    batch_size: int = 128, seed: int = 1234) -> float:
    """Mean flow-matching loss of ``model`` (at ``variant``) on a latent cache, at deterministic times and
    noise: times are the quantiles ``(i + 1/2) / N`` of the training time distribution (logit-normal +
    shift), dealt to samples by a seeded permutation; noise is drawn from ``seed``. Two models evaluated
    with the same cache and seed see exactly the same noised inputs, so differences are the models'."""
    from ..flow import FlowMatchingLoss
    from ..flow.objective import shift_time

    objective = objective or FlowMatchingLoss()
    latents = cache["latents"]
    n = len(latents)
    g = torch.Generator().manual_seed(seed)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.special.ndtri(q) * objective.std + objective.mean
    shift = objective.shift_for(latents[:1].float())
    times = shift_time(torch.sigmoid(u), shift).float().clamp(1e-5, 1 - 1e-5)[torch.randperm(n, generator=g)]
    noise = torch.randn(latents.shape, generator=g)
    device = next(model.parameters()).device
    was_training, cond_training = model.training, conditioning.training
    previous = getattr(model, "variant", "full")
    model.eval()
    conditioning.eval()
    if variant is not None:
        model.set_variant(variant)
    total = 0.0
    try:
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            cap = cache["caption_index"][sl]
            feats = (cache["text_tokens"][cap].float().to(device), cache["text_mask"][cap].to(device))
            text, mask = conditioning([feats])
            x0 = latents[sl].float().to(device)
            loss, per_sample, _ = objective(model, x0, t=times[sl].to(device), eps=noise[sl].to(device),
                                            cond={"text": text, "text_mask": mask})
            total += float(per_sample.sum())
    finally:
        if variant is not None:
            model.set_variant(previous)
        model.train(was_training)
        conditioning.train(cond_training)
    return total / n


# ======================================================================================================
class FlowTask:
    """Text-to-image flow matching of a ThreeStageDiT on cached latents and caption features."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..models import build_model
        from ..text import TextConditioning

        self.cfg, self.device = cfg, device
        _check_keys("data", cfg.data, {"spec", "num_samples", "cache", "resolution", "encode_batch", "val_spec",
                                       "val_samples", "val_cache", "shards"})
        _check_keys("elastic", cfg.elastic, {"num_random", "full_weight", "subnet_weight", "distill_weight"})
        _check_keys("text", cfg.text, {"encoder", "max_length", "drop_prob"})
        _check_keys("flow", cfg.flow, {"logit_mean", "logit_std", "shift"})
        _check_keys("vae", cfg.vae, {"path"})
        _check_keys("sampling", cfg.sampling, {"prompts", "steps", "guidance", "shift"})
        _check_keys("export", cfg.export, {"dtype"})
        model_kw = dict(cfg.model)
        # warm start from an exported pipeline folder (e.g. continue the shipped model on a new data mix)
        self.init_from = model_kw.pop("init_from", None)
        self.model = build_model(model_kw, device=device)
        mcfg = self.model.config
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self.text_spec = cfg.text.get("encoder", "minilm")
        self.text_max_length = int(cfg.text.get("max_length", 32))
        self.drop_prob = float(cfg.text.get("drop_prob", 0.1))
        self.cond_kwargs = None
        self.conditioning: TextConditioning | None = None
        from ..flow import FlowMatchingLoss

        f = cfg.flow
        self.objective = FlowMatchingLoss(mean=float(f.get("logit_mean", 0.0)), std=float(f.get("logit_std", 1.0)),
                                          shift=float(f.get("shift", 1.0)), patch_size=mcfg.patch_size)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.elastic_loss = None
        if mcfg.elastic_variants:  # a supernetwork: train every width each step (sandwich rule)
            from ..elastic.training import ElasticFlowLoss, WidthWeights

            e = cfg.elastic
            weights = WidthWeights(**{k: float(e[k]) for k in ("full_weight", "subnet_weight", "distill_weight")
                                      if k in e})
            self.elastic_loss = ElasticFlowLoss(self.objective, weights, int(e.get("num_random", 1)), cfg.seed)
        elif cfg.elastic:
            raise ValueError("the config has an elastic: section but the model is not elastic; set "
                             "model.elastic_variants (e.g. preset micro-elastic) or remove the section")
        self.kd = None
        self._text_encoder = None
        self._vae = None
        # the conditioning module must exist before the trainer collects parameters: infer the encoder
        # width now (minilm = 384; a custom encoder is probed from its config when the cache is absent)
        self._init_conditioning(self._encoder_dim())
        if self.init_from:
            self._warm_start(Path(self.init_from))
        if cfg.kd:
            self._init_kd(cfg.kd)

    # --- components ---------------------------------------------------------------------------------
    def _encoder_dim(self) -> int:
        if self.text_spec == "minilm":
            return 384
        if self.text_spec == "cache":  # tests: features come from the cache only
            return int(self.cfg.model.get("text_dim", self.model.config.text_dim))
        cfg_file = Path(self.text_spec) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"text encoder folder {self.text_spec} has no config.json")
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        for key in ("hidden_size", "d_model", "dim"):
            if key in c:
                return int(c[key])
        raise ValueError(f"cannot tell the hidden size of the text encoder in {self.text_spec}")

    def _init_kd(self, kd: dict) -> None:
        """Knowledge distillation from a frozen teacher pipeline (SnapGen++ Sec. 3.1; snapgen.distill.kd)."""
        from ..distill.kd import KnowledgeDistillationLoss
        from ..pipelines import TextToImagePipeline

        _check_keys("kd", kd, {"teacher", "scaling", "out_weight", "feat_weight"})
        if "teacher" not in kd:
            raise ValueError("kd needs 'teacher': a trained pipeline folder")
        teacher = TextToImagePipeline.from_pretrained(kd["teacher"])
        if list(teacher.conditioning.encoder_dims) != list(self.cond_kwargs["encoder_dims"]):
            raise ValueError(f"kd teacher {kd['teacher']} reads text features of widths "
                             f"{teacher.conditioning.encoder_dims}, this run {self.cond_kwargs['encoder_dims']}: "
                             f"teacher and student must use the same text encoder")
        self.kd_teacher = teacher.transformer.to(self.device).eval().requires_grad_(False)
        self.kd_teacher.set_variant("full")
        self.kd_conditioning = teacher.conditioning.to(self.device).eval().requires_grad_(False)
        tw = self.kd_teacher.config.width
        projectors = {name: torch.nn.Linear(int(self.model.config.width * r), tw)
                      for name, r in self.model.variants.items()}
        self.kd = KnowledgeDistillationLoss(self.kd_teacher, projectors, kd.get("scaling", "snapgen"),
                                            float(kd.get("out_weight", 1.0)), float(kd.get("feat_weight", 1.0)),
                                            self.objective.mean, self.objective.std).to(self.device)

    def _kd_loss(self, step: int, x0, feats, drops, t, eps):
        from ..flow import loss_per_time_bin
        from ..flow.objective import interpolate, velocity_target

        if drops is None:
            drops = [torch.zeros(x0.shape[0], dtype=torch.bool, device=self.device)]
        text, mask = self.conditioning([feats], drop=drops)
        t_text, t_mask = self.kd_conditioning([feats], drop=drops)  # the teacher sees the same dropped captions
        x_t, target = interpolate(x0, eps, t), velocity_target(x0, eps).float()
        v_t, f_t = self.kd.teacher_targets(x_t, t, {"text": t_text, "text_mask": t_mask})
        widths = ["full"]
        if self.elastic_loss is not None:
            from ..elastic.training import sample_subnetworks

            widths += sample_subnetworks(self.model.variants, step, self.cfg.seed, self.elastic_loss.num_random)
        total, logs, per_sample = 0.0, {}, None
        try:
            for name in widths:
                self.model.set_variant(name)
                v, f = self.model(x_t, t, {"text": text, "text_mask": mask}, features=("last",))
                f = f["last"]
                loss, parts = self.kd.per_width(name, v, f, target, v_t, f_t, t)
                total = total + loss
                logs.update({f"{k}_{name}": val for k, val in parts.items()})
                if per_sample is None:
                    per_sample = torch.nn.functional.mse_loss(v.detach().float(), target, reduction="none").flatten(1).mean(1)
        finally:
            self.model.set_variant("full")
        return total, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins), **logs}

    def _warm_start(self, directory: Path) -> None:
        """Load transformer + text-conditioning weights of a pipeline folder; the architecture must match, or
        the run's model must be the elastic version of it (then it is converted exactly: see make_elastic)."""
        from ..pipelines.text_to_image import TextToImagePipeline

        if not (directory / "pipeline.json").is_file():
            raise FileNotFoundError(f"model.init_from={directory} is not an exported pipeline folder "
                                    f"(no pipeline.json); point it at a run's final/ folder")
        src = TextToImagePipeline.from_pretrained(directory)
        source, target = src.transformer, self.model.config
        if target.elastic_variants and not source.config.elastic_variants:
            # ordinary model -> supernetwork: every width starts as the leading slice of the trained model
            from ..elastic.supernet import make_elastic, repeat_kv_heads

            if source.config.kv_heads != target.kv_heads:
                source = repeat_kv_heads(source, target.kv_heads)
            source = make_elastic(source, target.elastic_variants)
        if source.config != target:
            raise ValueError(f"model.init_from={directory} holds a transformer with a different config than "
                             f"this run's model; use the same preset/settings")
        self.model.load_state_dict(source.state_dict())
        self.conditioning.load_state_dict(src.conditioning.state_dict())
        print(f"warm start from {directory}")

    def _init_conditioning(self, dim: int) -> None:
        from ..text import TextConditioning

        self.cond_kwargs = {"encoder_dims": [dim], "out_dim": self.model.config.text_dim,
                            "drop_probs": [self.drop_prob], "null_length": 1}
        self.conditioning = TextConditioning(**self.cond_kwargs).to(self.device)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from ..pipelines.text_to_image import load_text_encoder

            if self.text_spec == "cache":
                raise RuntimeError("text.encoder 'cache' cannot encode new prompts")
            self._text_encoder = load_text_encoder(self.text_spec, self.text_max_length)
        return self._text_encoder

    @property
    def vae(self):
        if self._vae is None:
            from ..vae import load_autoencoder

            path = self.cfg.vae.get("path")
            if not path:
                raise ValueError("flow task needs vae.path (a trained autoencoder folder)")
            self._vae = load_autoencoder(path).to(self.device).eval()
        return self._vae

    def trainable_modules(self) -> dict:
        mods = {"transformer": self.model, "conditioning": self.conditioning}
        if self.kd is not None:
            mods["kd_projectors"] = self.kd.projectors  # trained with the student, not exported
        return mods

    # --- latent cache -------------------------------------------------------------------------------
    def cache_path(self, run_dir: Path) -> Path:
        p = self.cfg.data.get("cache")
        return Path(p) if p else run_dir / "latents.safetensors"

    # Two data paths. In-memory latent cache (``data.cache``, default): random batches by step, the draws of
    # a global batch shared by its parts (exact DDP == one process). Streamed latent shards (``data.shards``,
    # from ``snapgen data encode``): each rank reads its own disjoint shards, batches hold one aspect bucket,
    # and the stream position (with the not-yet-full buckets) is part of every checkpoint.
    rank: int = 0
    world: int = 1
    batcher = None

    def set_data_parallel(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _prepare_stream(self) -> None:
        from ..data.latent_shards import BucketBatcher, LatentShardStream

        d = self.cfg.data
        stream = LatentShardStream(d["shards"], rank=self.rank, world=self.world, seed=self.cfg.seed)
        C, D = stream.index.get("latent_channels"), stream.index.get("text_dim")
        if C != self.model.config.in_channels:
            raise ValueError(f"latent shards {d['shards']} hold {C}-channel latents, the model expects "
                             f"{self.model.config.in_channels}")
        if D != self.cond_kwargs["encoder_dims"][0]:
            raise ValueError(f"latent shards {d['shards']} hold {D}-d text features but the text encoder gives "
                             f"{self.cond_kwargs['encoder_dims'][0]}; encode them again with this encoder")
        self.batcher = BucketBatcher(stream, self.cfg.batch_size)
        self._batches = None
        print(f"latent shards: {stream.index['total']} samples in {len(stream.shards)} shards, grids "
              f"{stream.index.get('sizes')}; rank {self.rank}/{self.world} streams {len(stream._order(0))} shards")

    def data_state(self) -> dict | None:
        """This rank's stream position (None with the in-memory cache: batches are a function of the step)."""
        return self.batcher.state() if self.batcher is not None else None

    def load_data_state(self, state: dict) -> None:
        self.batcher.load_state(state)
        self._batches = None

    def _stream_batch(self, step: int, part: int):
        """Next batch of this rank's stream; times, noise and caption drops seeded by (seed, step, part)."""
        from ..data.latent_shards import collate_latents
        from ..flow.objective import logit_normal_times

        if self._batches is None:
            self._batches = iter(self.batcher)
        x0, feats = collate_latents(next(self._batches))
        x0 = x0.to(self.device)
        feats = (feats[0].to(self.device), feats[1].to(self.device))
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, step, part]).integers(2**62)))
        B = x0.shape[0]
        drops = [torch.rand(B, generator=g) < p for p in self.conditioning.drop_probs] \
            if self.conditioning.training else None
        o = self.objective
        t = logit_normal_times(B, o.mean, o.std, o.shift_for(x0), g, "cpu").to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        return x0, feats, drops, t, eps

    def prepare(self, run_dir: Path) -> None:
        from ..data.latent_cache import build_latent_cache, load_latent_cache

        if self.cfg.data.get("shards"):
            self._prepare_stream()
            self._prepare_val(run_dir)
            return
        path = self.cache_path(run_dir)
        if not path.is_file():
            if "spec" not in self.cfg.data:
                raise ValueError(f"no latent cache at {path} and no data.spec to build one from")
            build_latent_cache(path, self.cfg.data["spec"], self.vae, self.text_encoder,
                               num_samples=int(self.cfg.data.get("num_samples", 10000)),
                               batch_size=int(self.cfg.data.get("encode_batch", 64)))
        cache = load_latent_cache(path)
        self._prepare_val(run_dir)
        self.latents = cache["latents"]
        self.text_tokens, self.text_mask = cache["text_tokens"], cache["text_mask"]
        self.caption_index = cache["caption_index"]
        if self.text_tokens.shape[-1] != self.cond_kwargs["encoder_dims"][0]:
            raise ValueError(f"latent cache {path} holds {self.text_tokens.shape[-1]}-d text features but the "
                             f"text encoder gives {self.cond_kwargs['encoder_dims'][0]}; rebuild the cache")
        C = self.model.config.in_channels
        if self.latents.shape[1] != C:
            raise ValueError(f"latent cache {path} has {self.latents.shape[1]} channels, the model expects {C}")
        print(f"latent cache: {len(self.latents)} samples, latents {tuple(self.latents.shape[1:])}, "
              f"{len(self.text_tokens)} distinct captions")

    def _prepare_val(self, run_dir: Path) -> None:
        from ..data.latent_cache import build_latent_cache, load_latent_cache

        self.val = None
        if int(self.cfg.data.get("val_samples", 0)) > 0:
            vpath = Path(self.cfg.data.get("val_cache") or run_dir / "val_latents.safetensors")
            if not vpath.is_file():
                if "val_spec" not in self.cfg.data:
                    raise ValueError("data.val_samples is set but there is no data.val_spec to build it from")
                build_latent_cache(vpath, self.cfg.data["val_spec"], self.vae, self.text_encoder,
                                   num_samples=int(self.cfg.data["val_samples"]),
                                   batch_size=int(self.cfg.data.get("encode_batch", 64)))
            self.val = load_latent_cache(vpath)

    # --- training -----------------------------------------------------------------------------------
    # Data parallelism: a step's global batch is ``batch_size x parts`` samples (parts = ranks x gradient
    # accumulation); everything random (caption drops, times, noise) is drawn once per step for the global
    # batch, in the order a single process draws it, and each part computes on its slice. So N ranks, or N
    # accumulation steps, compute exactly the gradient of one process with the whole batch (tested), and
    # ``parts = 1`` consumes the RNGs exactly as before (old runs resume exactly).
    parts: int = 1

    def _step_draws(self, step: int, x0_shape: tuple) -> dict:
        from ..flow.objective import logit_normal_times

        if getattr(self, "_draws", (None,))[0] != step:
            G = x0_shape[0]
            drops = self.conditioning.sample_drops(G, self.device) if self.conditioning.training else None
            o = self.objective
            probe = torch.empty(x0_shape, device=self.device)
            t = logit_normal_times(G, o.mean, o.std, o.shift_for(probe), self.generator, self.device)
            eps = torch.randn(x0_shape, generator=self.generator, device=self.device)
            self._draws = (step, {"drops": drops, "t": t, "eps": eps})
        return self._draws[1]

    def loss(self, step: int, part: int = 0):
        B, parts = self.cfg.batch_size, self.parts
        if not 0 <= part < parts:
            raise ValueError(f"part {part} outside 0..{parts - 1}")
        if self.batcher is not None:
            x0, feats, drops, t, eps = self._stream_batch(step, part)
            return self._loss(step, x0, feats, drops, t, eps)
        idx_all = torch.from_numpy(batch_indices(self.cfg.seed, step, len(self.latents), B * parts))
        draws = self._step_draws(step, (B * parts, *self.latents.shape[1:]))
        sl = slice(part * B, (part + 1) * B)
        idx = idx_all[sl]
        x0 = self.latents[idx].float().to(self.device)
        cap = self.caption_index[idx]
        feats = (self.text_tokens[cap].float().to(self.device), self.text_mask[cap].to(self.device))
        drops = None if draws["drops"] is None else [d[sl] for d in draws["drops"]]
        t, eps = draws["t"][sl], draws["eps"][sl]
        return self._loss(step, x0, feats, drops, t, eps)

    def _loss(self, step: int, x0, feats, drops, t, eps):
        if self.kd is not None:
            return self._kd_loss(step, x0, feats, drops, t, eps)
        text, mask = self.conditioning([feats], drop=drops)
        from ..flow import loss_per_time_bin

        if self.elastic_loss is not None:
            loss, per_sample, t, logs = self.elastic_loss(self.model, x0, step, t=t, eps=eps,
                                                          cond={"text": text, "text_mask": mask})
            return loss, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins), **logs}
        loss, per_sample, t = self.objective(self.model, x0, t=t, eps=eps, cond={"text": text, "text_mask": mask})
        return loss, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation flow loss of every width on the validation cache (fixed times and noise)."""
        if self.val is None:
            return {}
        return {f"val_loss_{name}": round(validation_loss(self.model, self.conditioning, self.val, variant=name,
                                                          objective=self.objective), 6)
                for name in self.model.variants}

    # --- samples / export ---------------------------------------------------------------------------
    def pipeline(self):
        from ..pipelines.text_to_image import PipelineConfig, TextToImagePipeline

        s = self.cfg.sampling
        res = self.cfg.data.get("resolution", 64)
        res = (res, res) if isinstance(res, int) else tuple(res)
        pcfg = PipelineConfig(text_encoder=self.text_spec, text_max_length=self.text_max_length,
                              conditioning=self.cond_kwargs, resolution=res, steps=int(s.get("steps", 20)),
                              guidance=float(s.get("guidance", 4.0)), shift=float(s.get("shift", 1.0)))
        return TextToImagePipeline(self.model, self.conditioning, self.vae, pcfg, text_encoder=self._text_encoder
                                   if self.text_spec != "cache" else None)

    @torch.no_grad()
    def sample(self, path: Path, step: int) -> None:
        from ..pipelines.text_to_image import make_grid

        prompts = self.cfg.sampling.get("prompts") or []
        if not prompts or self.text_spec == "cache":
            return
        pipe = self.pipeline()
        images = pipe(prompts, seed=0)
        self._text_encoder = pipe.text_encoder
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, prompts, cols=min(len(prompts), 6), scale=2).save(path)
        self.model.train()
        self.conditioning.train()

    def export(self, out_dir: Path) -> Path:
        if self.text_spec == "cache" or not self.cfg.vae.get("path"):
            # tests: no autoencoder/text encoder; save the transformer alone
            self.model.save_pretrained(Path(out_dir) / "transformer")
            self._write_eval(Path(out_dir))
            return Path(out_dir)
        dtype = {"float32": torch.float32, "float16": torch.float16}[self.cfg.export.get("dtype", "float32")]
        pipe = self.pipeline()
        if Path(out_dir).exists():
            shutil.rmtree(out_dir)
        pipe.save_pretrained(out_dir, dtype=dtype)
        self._write_eval(Path(out_dir))
        print(f"pipeline exported to {out_dir}")
        return Path(out_dir)

    def _write_eval(self, out_dir: Path) -> None:
        report = self.evaluate()
        if report:
            (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            print(f"validation: {report}")


