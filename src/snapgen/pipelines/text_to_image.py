"""Text-to-image pipeline: text encoder -> conditioning -> three-stage DiT (a sampler + CFG) -> autoencoder.

A pipeline folder holds::

    pipeline.json                 PipelineConfig (text encoder(s), defaults for steps / guidance / size)
    README.md                     the model card (YAML front matter for the Hugging Face Hub; pipelines/card.py)
    transformer/                  ThreeStageDiT (config.json + model.safetensors)
    text_conditioning.safetensors learned null embedding(s) and projections (snapgen.text.TextConditioning)
    vae/                          the autoencoder (snapgen Autoencoder, or a diffusers AutoencoderKL,
                                  AutoencoderKLQwenImage or AutoencoderKLWan: snapgen.vae.load_autoencoder)

Weights may be stored in float16 to keep shipped models small; they are loaded into float32 (this
CPU has no fast half-precision matmul).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data.base import tensor_to_image
from ..sampling import SamplerConfig, guided, make_sampler
from .. import compress  # noqa: F401  (registers the quantized-folder loader with load_model)
from ..models import ThreeStageDiT, load_model
from ..utils.random import randn, seed_generators
from ..nn.hub import resolve_pretrained
from ..nn.io import atomic_save_safetensors
from .. import env
from ..text.loading import load_text_encoder
from ..utils.images import make_grid  # noqa: F401  (re-exported: older imports)
from .config import PipelineConfig

__all__ = ["PipelineConfig", "TextToImagePipeline", "default_model_dir"]

MAX_SIDE = 2048          # image pixels; beyond this a CPU run takes hours, so it is refused
MAX_PROMPT_CHARS = 1000


def default_model_dir() -> Path:
    """The shipped model: ``$SNAPGEN_MODEL`` or ``models/snapgen-micro`` in the repository."""
    return env.model_dir()


class TextToImagePipeline:
    def __init__(self, transformer: ThreeStageDiT, conditioning: torch.nn.Module, vae, config: PipelineConfig,
                 text_encoder=None):
        self.transformer = transformer.eval()
        self.conditioning = conditioning.eval()
        self.vae = vae.eval() if hasattr(vae, "eval") else vae
        self.config = config
        self._text_encoder = text_encoder
        self._base_mode = False

    # --- components ---------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.config.text_encoder, self.config.text_max_length)
            self._move_text_encoder()
        return self._text_encoder

    # --- placement ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the transformer (and so the sampling) runs."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """Move the transformer, text conditioning and autoencoder to ``device`` / ``dtype`` (like
        ``nn.Module.to``); a text encoder's model follows to ``device`` and stays fp32 (its features are cast by
        the conditioning). Seeded noise is still drawn from CPU generators and moved (:mod:`snapgen.utils.random`),
        so a seed gives the same noise on every device."""
        if isinstance(device, torch.dtype):  # pipe.to(torch.float16)
            device, dtype = None, device
        for module in (self.transformer, self.conditioning, self.vae):
            module.to(device=device, dtype=dtype)
        self._encoder_device = torch.device(device) if device is not None else getattr(self, "_encoder_device", None)
        self._move_text_encoder()
        return self

    @property
    def text_encoders(self) -> list:
        """The single encoders behind :attr:`text_encoder` (one, or a :class:`~snapgen.text.MultiTextEncoder`'s)."""
        from ..text import encoder_list

        return encoder_list(self.text_encoder)

    def _move_text_encoder(self) -> None:
        from ..text import encoder_list

        device = getattr(self, "_encoder_device", None)
        for encoder in encoder_list(self._text_encoder) if self._text_encoder is not None else ():
            model = getattr(encoder, "model", None)  # an ONNX encoder has none: it runs on the CPU
            if device is not None and isinstance(model, torch.nn.Module):
                model.to(device)

    @property
    def vae_factor(self) -> int:
        return int(self.vae.factor)

    # --- elastic sub-networks -----------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        """Sub-networks the transformer serves, smallest first (``["full"]`` for a non-elastic model)."""
        return sorted(self.transformer.variants, key=self.transformer.variants.get)

    @property
    def variant(self) -> str:
        return self.transformer.variant

    def set_variant(self, name: str) -> "TextToImagePipeline":
        """Generate with sub-network ``name`` ("tiny" / "small" / "full" for the shipped supernetwork); a
        distilled pipeline switches on that variant's few-step adapter."""
        self.transformer.set_variant(name)
        self._activate_adapter()
        return self

    @property
    def distilled(self) -> bool:
        return bool(self.config.adapters)

    def use_base(self, on: bool = True) -> "TextToImagePipeline":
        """Distilled pipelines: generate with the base (teacher) model -- adapters off, its own sampler,
        steps and guidance -- instead of the few-step generator."""
        if on and not self.distilled:
            raise ValueError("this pipeline is not distilled: it has no few-step adapters to switch off")
        self._base_mode = bool(on)
        self._activate_adapter()
        return self

    def _activate_adapter(self) -> None:
        if not self.distilled:
            return
        from ..nn.lora import set_adapter

        set_adapter(self.transformer, self._adapter_for(self.transformer.variant))

    def _adapter_for(self, variant: str) -> str | None:
        """The few-step adapter that serves ``variant`` now (None in base mode); a clear error if none does."""
        if self._base_mode:
            return None
        name = self.config.adapters.get(variant)
        if name is None:
            raise ValueError(f"this distilled pipeline has few-step adapters for {sorted(self.config.adapters)}, "
                             f"not for {variant!r}; pick one of those, or use_base()")
        return name

    def sampler_config(self) -> SamplerConfig:
        """The sampler used by default now: the base model's after ``use_base()``, else the pipeline's."""
        return self.config.base_sampler_config() if self._base_mode else self.config.sampler_config()

    def sampling_settings(self) -> dict:
        """The sampler, steps, guidance and shift used by default now."""
        return self.sampler_config().settings()

    def extract(self, name: str) -> "TextToImagePipeline":
        """A standalone pipeline whose transformer holds only sub-network ``name``'s weights.

        Distilled pipelines: the variant's few-step adapter is merged into those weights (exactly), so the
        result is a plain model that samples like the few-step generator; after ``use_base()`` it is the base
        model with the base sampler instead. Either way the result carries no adapters."""
        from ..nn.lora import merge_lora, set_adapter
        from ..elastic.supernet import extract_variant

        model = self.transformer
        if name not in model.variants:
            raise ValueError(f"variant {name!r} is not served by this model (it serves {sorted(model.variants)})")
        config = self.config
        if self.distilled:
            adapter = self._adapter_for(name)
            if adapter is not None:
                model = merge_lora(model, adapter)  # a copy: this pipeline keeps its adapters
                set_adapter(model, None)
            if self._base_mode:  # the base sampler becomes the extracted pipeline's own (on its derived grid)
                config = config.with_sampler(self.sampler_config().replace(times=()))
            config = config.replace(adapters={}, base_sampling={})
        sub = extract_variant(model, name)
        return TextToImagePipeline(sub, self.conditioning, self.vae, config, self._text_encoder)

    # --- io -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        model_card: bool = True) -> Path:
        """Write the pipeline folder (module docstring) and, with ``model_card``, its ``README.md`` model card
        (:mod:`snapgen.pipelines.card`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_module(self.transformer, directory / "transformer", dtype)
        _save_module(self.vae, directory / "vae", dtype)
        atomic_save_safetensors({k: v.to(dtype) if v.is_floating_point() else v
                                 for k, v in self.conditioning.state_dict().items()},
                                directory / "text_conditioning.safetensors")
        if self.config.adapters:
            from ..nn.lora import save_lora

            for name in sorted(set(self.config.adapters.values())):
                save_lora(self.transformer, name, directory / "adapters" / f"{name}.safetensors")
        tmp = directory / ".pipeline.json.tmp"
        self.config.to_json(tmp)
        os.replace(tmp, directory / "pipeline.json")
        if model_card:
            from .card import write_pipeline_card

            write_pipeline_card(self, directory, dtype)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None = None, text_encoder=None,
                        variant: str | None = None) -> "TextToImagePipeline":
        """Load a pipeline folder, or a Hugging Face Hub id holding one (:func:`snapgen.nn.hub.resolve_pretrained`:
        the cache first, then a download unless ``HF_HUB_OFFLINE``); ``variant`` selects an elastic sub-network
        (default: full width)."""
        from ..text import TextConditioning
        from ..vae import load_autoencoder

        directory = resolve_pretrained(directory if directory is not None else default_model_dir(), "model",
                                       "a folder written by TextToImagePipeline.save_pretrained (e.g. a run's "
                                       "final/ folder; --model DIR on the command line)")
        if not (directory / "pipeline.json").is_file():
            raise FileNotFoundError(f"{directory} is not a snapgen pipeline folder: pipeline.json is missing "
                                    f"(expected pipeline.json, transformer/, vae/, text_conditioning.safetensors)")
        config = PipelineConfig.from_json(directory / "pipeline.json")
        transformer = load_model(directory / "transformer")  # any registered family, or a quantized folder
        vae = load_autoencoder(directory / "vae")
        cond_path = directory / "text_conditioning.safetensors"
        if not cond_path.is_file():
            raise FileNotFoundError(f"{cond_path} is missing; the pipeline folder is incomplete")
        try:
            state = load_file(str(cond_path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {cond_path}: {e}. The file is corrupt; re-save the pipeline") from None
        conditioning = TextConditioning(**config.conditioning)
        n = 1 if isinstance(config.text_encoder, str) else len(config.text_encoder)
        if conditioning.num_encoders != n:
            raise ValueError(f"{directory / 'pipeline.json'} lists {n} text encoder(s) but its conditioning takes "
                             f"{conditioning.num_encoders}; the folder is inconsistent: re-save the pipeline")
        try:
            conditioning.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(f"{cond_path} does not match pipeline.json's conditioning settings: {e}") from None
        for name in sorted(set(config.adapters.values())):
            from ..nn.lora import load_lora

            path = directory / "adapters" / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: pipeline.json lists adapter {name!r}; the pipeline "
                                        f"folder is incomplete")
            load_lora(transformer, path, name=name)
        pipe = cls(transformer, conditioning, vae, config, text_encoder)
        if variant is None:  # default: full width, or the widest variant that has a few-step adapter
            variant = transformer.variant
            if config.adapters and variant not in config.adapters:
                variant = max(config.adapters, key=lambda v: transformer.variants.get(v, 0))
        return pipe.set_variant(variant)

    # --- generation ---------------------------------------------------------------------------------
    def check_inputs(self, prompts, height: int, width: int, steps: int, guidance: float) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        try:
            prompts = list(prompts)
        except TypeError:
            raise TypeError(f"prompts must be a string or a list of strings, "
                            f"got {type(prompts).__name__}") from None
        if not prompts:
            raise ValueError("no prompt given: pass at least one non-empty prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            if not p.strip():
                raise ValueError("empty prompt: describe the image, e.g. \"a red circle to the left of a blue square\"")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is {len(p)} characters long; keep it under {MAX_PROMPT_CHARS} "
                                 f"(the text encoder reads only {self.config.text_max_length} tokens anyway)")
        mult = self.vae_factor * self.transformer.config.downsample
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            if v > MAX_SIDE:
                raise ValueError(f"{name}={v} is too large (max {MAX_SIDE}); this model was trained at "
                                 f"{self.config.resolution[0]}x{self.config.resolution[1]}")
            if v % mult:
                lo, hi = max(mult, v // mult * mult), (v // mult + 1) * mult
                raise ValueError(f"{name}={v} must be a multiple of {mult} (autoencoder factor "
                                 f"{self.vae_factor} x transformer downsampling {self.transformer.config.downsample}); "
                                 f"nearest valid: {lo} or {hi}")
        if not isinstance(steps, int) or steps < 1 or steps > 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
        if not (0.0 <= guidance <= 50.0):
            raise ValueError(f"guidance must be in [0, 50] (1 = no guidance), got {guidance}")
        return prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]):
        """``(cond, uncond)``: every encoder's features of ``prompts`` (none dropped), and the all-null condition
        (every encoder dropped: classifier-free guidance's unconditional branch)."""
        from ..text import encode_features

        feats = encode_features(self.text_encoder, prompts)
        cond = self.conditioning(feats, drop=[torch.zeros(len(prompts), dtype=torch.bool)] * len(feats))
        uncond = self.conditioning.null(len(prompts))
        return cond, uncond

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], steps: int | None = None, guidance: float | None = None,
                 seed: int | list[int] | None = 0, height: int | None = None, width: int | None = None,
                 shift: float | None = None, progress: bool = False, return_latents: bool = False,
                 stage_steps: list[int] | None = None, preview: Callable | None = None):
        """Images (or latents) for ``prompts``. ``seed``: an int seeds one generator for the whole batch (its
        noise drawn together, as every release has); a list of ints, one per prompt, seeds one generator per
        image, so image ``i``'s initial noise and every noise the sampler draws for it come from ``seed[i]``
        alone: it is the image of ``pipe([prompts[i]], seed=seed[i])`` whatever else is in the batch (up to the
        rounding of batched matmuls). ``None``: unseeded.

        A DFM model (``dfm_levels`` > 1) samples progressively: ``stage_steps`` overrides the steps per pyramid stage
        (``steps`` is their sum), and ``preview(k, images, seconds)`` receives, as stage ``k`` ends, the images of
        the coarse levels generated so far (the progressive preview), ``seconds`` after sampling began."""
        cfg = self.config
        sampler_config = self.sampler_config()
        dfm_levels = getattr(self.transformer.config, "dfm_levels", 1)
        if stage_steps is not None:
            if sampler_config.kind != "dfm":
                raise ValueError(f"stage_steps is a setting of the dfm sampler; this pipeline samples with "
                                 f"{sampler_config.kind!r} (use steps)")
            sampler_config = sampler_config.replace(stage_steps=tuple(stage_steps), steps=None)
        if sampler_config.kind == "dfm" and steps is not None and steps != sampler_config.steps:
            raise ValueError(f"a DFM pipeline takes its steps per stage: pass stage_steps (e.g. --stage-steps "
                             f"{' '.join(map(str, sampler_config.stage_steps))}; now {sampler_config.steps} in all), "
                             f"not steps={steps}")
        steps = sampler_config.steps if steps is None else steps
        guidance = sampler_config.guidance if guidance is None else guidance
        height = cfg.resolution[0] if height is None else height
        width = cfg.resolution[1] if width is None else width
        prompts = self.check_inputs(prompts, height, width, steps, guidance)
        gen = seed_generators(seed, len(prompts))  # a list of seeds of the wrong length: ValueError
        sampler = make_sampler(sampler_config.override(steps=steps, shift=shift, guidance=guidance))
        t0 = time.perf_counter()
        B = len(prompts)
        (text, mask), (null_text, null_mask) = self.encode_prompts(prompts)
        # pad cond/uncond to the same length so they run as one batch
        L = max(text.shape[1], null_text.shape[1])
        text, mask = _pad_tokens(text, mask, L)
        null_text, null_mask = _pad_tokens(null_text, null_mask, L)
        f = self.vae_factor
        C = self.transformer.config.in_channels
        velocity = guided(self.transformer, {"text": text, "text_mask": mask},
                          {"text": null_text, "text_mask": null_mask}, sampler.config.guidance)
        if dfm_levels > 1 or sampler.config.kind == "dfm":  # progressive: the packed pyramid, previews per stage
            from .progressive import dfm_latents

            def on_preview(k, latents, seconds):
                if preview is not None:
                    preview(k, [tensor_to_image(im) for im in self.vae.decode_latents(latents)], seconds)

            latents = dfm_latents(dfm_levels, sampler, velocity, (B, C, height // f, width // f), gen, self.device,
                                  self.dtype, progress=progress, on_preview=on_preview)
        else:
            # first draw (on the generator's device, then moved; a seed list: row i from gen[i]); the sampler's
            # follow
            noise = randn((B, C, height // f, width // f), gen, device=self.device, dtype=self.dtype)
            latents = sampler.sample(velocity, noise, generator=gen, progress=progress)
        if return_latents:
            return latents
        images = self.vae.decode_latents(latents)
        self.last_seconds = time.perf_counter() - t0
        return [tensor_to_image(im) for im in images]


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int):
    pad = length - tokens.shape[1]
    if pad == 0:
        return tokens, mask
    tokens = torch.nn.functional.pad(tokens, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return tokens, mask


def _save_module(module, directory: Path, dtype: torch.dtype) -> None:
    if hasattr(module, "vae"):  # DiffusersAutoencoder
        module.vae.save_pretrained(directory, safe_serialization=True)
        return
    module.save_pretrained(directory, dtype=dtype, model_card=False)  # the pipeline's card covers it
