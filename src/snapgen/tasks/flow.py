"""``flow``: the text-to-image three-stage DiT by flow matching on a latent cache (images encoded once by the
autoencoder, captions once by the frozen text encoder) or on streamed latent shards, exported as a pipeline
folder. Elastic supernetworks train every width each step; a ``kd:`` section adds a teacher (flow_kd.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.batches import part_indices, part_slice
from .base import ROLES, ParamGroup, Task, check_keys
from .flow_kd import FlowKD
from .flow_text import FlowText
from .registry import register_task
from .validation import validation_loss

__all__ = ["FlowTask"]


@register_task("flow", kind="train", methods=("kd",))
class FlowTask(FlowKD, FlowText, Task):
    """Text-to-image flow matching of a ThreeStageDiT on cached latents and caption features.

    ``text_encoder``: an encoder object to use instead of loading ``text.encoder`` (its ``dim`` sets the
    conditioning width); training itself reads only the cached caption features."""

    def __init__(self, cfg, device: torch.device, text_encoder=None):
        from ..models import build_model
        from ..text import TextConditioning

        self.cfg, self.device = cfg, device
        check_keys("data", cfg.data, {"spec", "num_samples", "cache", "resolution", "encode_batch", "val_spec",
                                       "val_samples", "val_cache", "shards"})
        check_keys("elastic", cfg.elastic, {"num_random", "full_weight", "subnet_weight", "distill_weight"})
        check_keys("text", cfg.text, {"encoder", "max_length", "drop_prob", "drop_all_prob"})
        from ..flow.registry import FLOW_KEYS, build_objective

        check_keys("flow", cfg.flow, FLOW_KEYS)
        check_keys("vae", cfg.vae, {"path"})
        check_keys("sampling", cfg.sampling, {"prompts", "steps", "guidance", "shift", "stage_steps",
                                              "stage_thresholds"})
        check_keys("export", cfg.export, {"dtype"})
        model_kw = dict(cfg.model)
        # warm start from an exported pipeline folder (e.g. continue the shipped model on a new data mix)
        self.init_from = model_kw.pop("init_from", None)
        # elastic warm start: sort the trained model's channels by importance before slicing (importance.py)
        self.sort_by_importance = model_kw.pop("sort_by_importance", False)
        if not isinstance(self.sort_by_importance, bool):
            raise ValueError(f"model.sort_by_importance must be true or false, got {self.sort_by_importance!r}")
        if self.sort_by_importance and not self.init_from:
            raise ValueError("model.sort_by_importance applies to a warm start: set model.init_from too")
        self.model = build_model(model_kw, device=device)
        mcfg = self.model.config
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self._read_text_config(cfg.text)
        self.drop_all_prob = float(cfg.text.get("drop_all_prob", 0.0))   # joint drop of every encoder (CFG)
        self.cond_kwargs = None
        self.conditioning: TextConditioning | None = None
        self.objective = build_objective(cfg.flow, mcfg)  # fm, or dfm over the model's pyramid levels
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
        self._text_encoder = text_encoder
        self._vae = None
        # the conditioning module must exist before the trainer collects parameters: infer the encoder
        # widths now (minilm = 384; a custom encoder is probed from its config when the cache is absent)
        self._init_conditioning(self._encoder_dims())
        if self.init_from:
            self._warm_start(Path(self.init_from))
        if cfg.kd:
            if self.objective.name == "dfm":
                raise ValueError("knowledge distillation (kd:) reads a plain flow teacher's velocity; it is not "
                                 "defined for flow.objective: dfm (train the DFM model without kd:)")
            self._init_kd(cfg.kd)

    # --- components ---------------------------------------------------------------------------------
    @classmethod
    def distill_method(cls, cfg) -> str | None:
        return "kd" if cfg.kd else None

    def _warm_start(self, directory: Path) -> None:
        """Load transformer + text-conditioning weights of a pipeline folder; the architecture must match, or
        the run's model must be the elastic version of it (then it is converted exactly: see make_elastic;
        ``model.sort_by_importance: true`` sorts its channels by importance first, the same full-width function)."""
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
            source = make_elastic(source, target.elastic_variants, sort=self.sort_by_importance,
                                  modulation=target.elastic_modulation)
        elif self.sort_by_importance:
            raise ValueError("model.sort_by_importance: true needs an elastic run model (model.elastic_variants) "
                             "warm-started from an ordinary (non-elastic) pipeline; it would change nothing here")
        if target.dfm_levels > 1 and source.config.dfm_levels == 1:
            # plain -> DFM (fine-tuning): the finest level is the trained model, coarser levels start as its
            # embedding / head of the upsampled level (snapgen.models.multiscale.to_dfm)
            from ..models.multiscale import to_dfm

            source = to_dfm(source, target.dfm_levels)
        if source.config != target:
            raise ValueError(f"model.init_from={directory} holds a transformer with a different config than "
                             f"this run's model; use the same preset/settings")
        self.model.load_state_dict(source.state_dict())
        self.conditioning.load_state_dict(src.conditioning.state_dict())
        print(f"warm start from {directory}")

    def _init_conditioning(self, dims: list[int]) -> None:
        from ..text import TextConditioning

        self.cond_kwargs = {"encoder_dims": list(dims), "out_dim": self.model.config.text_dim,
                            "drop_probs": list(self.drop_probs), "null_length": 1}
        if self.drop_all_prob:
            self.cond_kwargs["drop_all_prob"] = self.drop_all_prob
        self.conditioning = TextConditioning(**self.cond_kwargs).to(self.device)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from ..text.loading import load_text_encoder

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

    @property
    def widths_per_step(self) -> int:
        """Widths of the supernetwork one loss runs (full + the sandwich rule's sub-networks), each a forward
        through every block; FSDP keeps blocks gathered when it is > 1 (``snapgen.train.distributed``)."""
        if self.elastic_loss is None:
            return 1
        from ..elastic.training import sample_subnetworks

        return 1 + len(sample_subnetworks(self.model.variants, 0, self.cfg.seed, self.elastic_loss.num_random))

    def modules(self) -> dict:
        mods = {"transformer": (self.model, ROLES), "conditioning": (self.conditioning, ROLES)}
        if self.kd is not None:  # trained with the student (same group, one clip), not averaged or exported
            mods["kd_projectors"] = (self.kd.projectors, frozenset({"trained"}))
        return mods

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("model", tuple(self.modules()))]

    # --- latent cache -------------------------------------------------------------------------------
    def cache_path(self, run_dir: Path) -> Path:
        p = self.cfg.data.get("cache")
        return Path(p) if p else run_dir / "latents.safetensors"

    # Two data paths. In-memory latent cache (``data.cache``, default): random batches by step, the draws of
    # a global batch shared by its parts (exact DDP == one process). Streamed latent shards (``data.shards``,
    # from ``snapgen data encode``): each rank reads its own disjoint shards, batches hold one aspect bucket,
    # and the stream position (with the not-yet-full buckets) is part of every checkpoint.
    batcher = None

    def _prepare_stream(self) -> None:
        from ..data.latent_shards import BucketBatcher, LatentShardStream

        d = self.cfg.data
        stream = LatentShardStream(d["shards"], rank=self.rank, world=self.world, seed=self.cfg.seed)
        C, D = stream.index.get("latent_channels"), stream.index.get("text_dims", [stream.index.get("text_dim")])
        if C != self.model.config.in_channels:
            raise ValueError(f"latent shards {d['shards']} hold {C}-channel latents, the model expects "
                             f"{self.model.config.in_channels}")
        stored = stream.index.get("text_encoders")
        if stored is not None or len(self.text_specs) > 1:
            from ..data.latent_cache import check_cache_encoders

            check_cache_encoders({"text_features": [None] * len(D), "text_encoders": stored}, d["shards"],
                                 self.text_specs, self.text_max_lengths)
        if D != self.cond_kwargs["encoder_dims"]:
            dims = self.cond_kwargs["encoder_dims"]
            raise ValueError(f"latent shards {d['shards']} hold {'/'.join(map(str, D))}-d text features but the "
                             f"text encoder gives {'/'.join(map(str, dims))}; encode them again with this encoder")
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
        from ..data.latent_shards import collate_features

        if self._batches is None:
            self._batches = iter(self.batcher)
        batch = next(self._batches)
        captions = [s.caption for s in batch]
        x0, feats = collate_features(batch)
        x0 = x0.to(self.device)
        feats = [(tokens.to(self.device), mask.to(self.device)) for tokens, mask in feats]
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, step, part]).integers(2**62)))
        B = x0.shape[0]
        drops = self.conditioning.sample_drops(B, generator=g) if self.conditioning.training else None
        stage = None
        if self.objective.name == "dfm":  # one stage Q per global step: the same on every rank and part
            stage = self.objective.draw_stage(torch.Generator().manual_seed(
                int(np.random.default_rng([self.cfg.seed, step, 7919]).integers(2**62))))
        t, eps = self.objective.draw(tuple(x0.shape), g, "cpu", stage=stage)
        return x0, feats, drops, t.to(self.device), eps.to(self.device), captions

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
                               batch_size=int(self.cfg.data.get("encode_batch", 64)), progress=self.progress)
        cache = load_latent_cache(path)
        self._check_cache(cache, path)
        self._prepare_val(run_dir)
        self.latents = cache["latents"]
        self.text_features = cache["text_features"]
        self.text_tokens, self.text_mask = self.text_features[0]
        self.caption_index = cache["caption_index"]
        self.captions = cache["captions"]
        if self.kd_teacher is not None and self.kd_teacher.needs_captions:
            if len(self.captions) != len(self.text_tokens):
                raise ValueError(f"latent cache {path} stores {len(self.captions)} caption strings for "
                                 f"{len(self.text_tokens)} captions; the kd teacher encodes caption strings with "
                                 f"its own text encoder: rebuild the cache")
            self._kd_prepare(self.captions)
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
                                   batch_size=int(self.cfg.data.get("encode_batch", 64)), progress=self.progress)
            self.val = load_latent_cache(vpath)
            self._check_cache(self.val, vpath)

    # --- training -----------------------------------------------------------------------------------
    # Data parallelism: a step's global batch is ``batch_size x parts`` samples (parts = ranks x gradient
    # accumulation, items from snapgen.data.batches.part_indices); everything random (caption drops, times,
    # noise) is drawn once per step for the global batch, in the order a single process draws it, and each
    # part computes on its slice. So N ranks, or N accumulation steps, compute exactly the gradient of one
    # process with the whole batch (tested), and ``parts = 1`` consumes the RNGs exactly as before.

    def _step_draws(self, step: int, x0_shape: tuple) -> dict:
        if getattr(self, "_draws", (None,))[0] != step:
            G = x0_shape[0]
            drops = self.conditioning.sample_drops(G, self.device) if self.conditioning.training else None
            # times then noise (DFM: the step's stage Q, every level's time, the packed noise), for the global batch
            t, eps = self.objective.draw(tuple(x0_shape), self.generator, self.device)
            self._draws = (step, {"drops": drops, "t": t, "eps": eps})
        return self._draws[1]

    def loss(self, step: int, part: int = 0):
        from ..data.latent_cache import cache_features

        B, parts = self.cfg.batch_size, self.parts
        sl = part_slice(part, parts, B)
        if self.batcher is not None:
            x0, feats, drops, t, eps, captions = self._stream_batch(step, part)
            return self._loss(step, x0, feats, drops, t, eps, captions)
        idx = torch.from_numpy(part_indices(self.cfg.seed, step, len(self.latents), B, part, parts))
        draws = self._step_draws(step, (B * parts, *self.latents.shape[1:]))
        x0 = self.latents[idx].float().to(self.device)
        cap = self.caption_index[idx]
        feats = cache_features(self.text_features, cap, self.device)
        drops = None if draws["drops"] is None else [d[sl] for d in draws["drops"]]
        t, eps = draws["t"][sl], draws["eps"][sl]
        captions = [self.captions[i] for i in cap.tolist()] if self.kd_teacher is not None \
            and self.kd_teacher.needs_captions else None
        return self._loss(step, x0, feats, drops, t, eps, captions)

    def _loss(self, step: int, x0, feats, drops, t, eps, captions=None):
        if self.kd is not None:
            return self._kd_loss(step, x0, feats, drops, t, eps, captions)
        text, mask = self.conditioning(feats, drop=drops)
        from ..flow import loss_per_time_bin

        if self.elastic_loss is not None:
            loss, per_sample, t, logs = self.elastic_loss(self.model, x0, step, t=t, eps=eps,
                                                          cond={"text": text, "text_mask": mask})
            return loss, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins), **logs}
        if self.objective.name == "dfm":  # logged per stage Q and per level (Alg. 1's masked, summed losses)
            out = self.objective.terms(self.model, x0, times=t, eps=eps, cond={"text": text, "text_mask": mask})
            q = out.stage
            logs = {f"loss_stage{q}": float(out.loss.detach()),
                    **{f"loss_stage{q}_level{s}": float(out.per_level[:, s].detach().mean()) for s in range(q + 1)}}
            return out.loss, {"bins": loss_per_time_bin(out.per_sample, out.t, self.cfg.time_bins), **logs}
        loss, per_sample, t = self.objective(self.model, x0, t=t, eps=eps, cond={"text": text, "text_mask": mask})
        return loss, {"bins": loss_per_time_bin(per_sample, t, self.cfg.time_bins)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation flow loss of every width on the validation cache (fixed times and noise)."""
        if self.val is None:
            return {}
        if self.objective.name == "dfm":  # per stage, and their stage_probs-weighted sum (the training mix)
            from .validation import dfm_validation_report

            return dfm_validation_report(self.model, self.conditioning, self.val, self.objective)
        return {f"val_loss_{name}": round(validation_loss(self.model, self.conditioning, self.val, variant=name,
                                                          objective=self.objective), 6)
                for name in self.model.variants}

    # --- samples / export ---------------------------------------------------------------------------
    def pipeline(self):
        from ..pipelines.text_to_image import PipelineConfig, TextToImagePipeline

        s = self.cfg.sampling
        res = self.cfg.data.get("resolution", 64)
        res = (res, res) if isinstance(res, int) else tuple(res)
        steps = int(s.get("steps", 20))
        dfm = {}
        if self.model.config.dfm_levels > 1:  # the stage-scheduled sampler (sampling.stage_steps / stage_thresholds)
            from ..pipelines.progressive import default_dfm_sampling

            dfm = {"sampler": "dfm", **default_dfm_sampling(self.model.config.dfm_levels, steps, s)}
            steps = sum(dfm["stage_steps"])
        pcfg = PipelineConfig(text_encoder=self.text_spec, text_max_length=self.text_max_length,
                              conditioning=self.cond_kwargs, resolution=res, steps=steps,
                              guidance=float(s.get("guidance", 4.0)), shift=float(s.get("shift", 1.0)), **dfm)
        return TextToImagePipeline(self.model, self.conditioning, self.vae, pcfg, text_encoder=self._text_encoder)

    @torch.no_grad()
    def sample(self, path: Path, step: int) -> None:
        from ..utils.images import make_grid

        prompts = self.cfg.sampling.get("prompts") or []
        if not prompts:
            return
        pipe = self.pipeline()
        images = pipe(prompts, seed=0)
        self._text_encoder = pipe.text_encoder
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, prompts, cols=min(len(prompts), 6), scale=2).save(path)
        self.model.train()
        self.conditioning.train()

    def export(self, out_dir: Path) -> Path:
        if not self.cfg.vae.get("path"):  # no autoencoder to build a pipeline with: the transformer alone
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
