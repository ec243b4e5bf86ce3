"""How each diffusers flow transformer family is called, converted to snapgen's convention at this boundary.

diffusers' flow-matching families (checked in diffusers 0.42's sources, ``FlowMatchEulerDiscreteScheduler``:
``scale_noise`` gives ``x_t = sigma * eps + (1 - sigma) * x0`` and ``step`` is ``x + (sigma_next - sigma) *
model_output``) predict ``eps - x0`` at noise level ``sigma``: exactly snapgen's ``v`` at ``t = sigma``. What
differs per family is the timestep scale, the latent layout and the extra inputs (``H, W``: latent sizes;
text inputs always come from the family pipeline's own ``encode_prompt``):

* ``SD3Transformer2DModel`` (SD3 / SD3.5): ``timestep = 1000 t`` (the pipeline passes
  ``scheduler.timesteps = 1000 sigma``; the embedding does not rescale); latents ``(B, C, H, W)``, patchified
  inside (``patch_size``); ``encoder_hidden_states`` = CLIP-L + CLIP-G penultimate states (padded to T5's
  width) followed by T5's tokens (zeros without T5), ``pooled_projections`` = both CLIP pooled outputs.
* ``FluxTransformer2DModel`` (Flux): ``timestep = t`` (the pipeline passes ``timestep / 1000``; the model
  multiplies by 1000); 2x2 patches packed into ``(B, H/2 * W/2, 4C)`` tokens (channel-major per patch, raster
  order; :func:`pack_latents`); ``encoder_hidden_states`` = T5, ``pooled_projections`` = CLIP, ``txt_ids``
  zeros, ``img_ids`` ``(0, row, col)``; Flux-dev's ``guidance`` is an embedding (x1000 inside), not CFG.
* ``QwenImageTransformer2DModel`` (Qwen-Image): ``timestep = t`` (pipeline ``timestep / 1000``;
  ``Timesteps(scale=1000)`` inside); packed like Flux, ``img_shapes = [(1, H/2, W/2)]``;
  ``encoder_hidden_states`` = Qwen2.5-VL's last hidden state with the prompt template's tokens dropped, and
  its ``encoder_hidden_states_mask``. True CFG rescales the guided prediction per token to the conditional
  one's norm (``cfg_renorm``).

The latents themselves are the pipelines' normalised VAE latents (AutoencoderKL:
``(z - shift_factor) * scaling_factor``; Qwen-Image's VAE: ``(z - latents_mean) / latents_std``): the student
must be trained on the same latents (the same VAE through snapgen's adapter).
"""

from __future__ import annotations

import torch

__all__ = ["FAMILIES", "Family", "family_of", "pack_latents", "unpack_latents"]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: Flux's / Qwen-Image's ``_pack_latents``."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` (Flux's ``_unpack_latents`` without the VAE-factor arithmetic)."""
    B, N, D = tokens.shape
    return tokens.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


class Family:
    """One diffusers transformer family: its pipeline class (whose ``encode_prompt`` is the teacher's text
    side), components and the conversion of a call."""

    name: str
    transformer_class: str
    pipeline_class: str
    text_components: tuple[str, ...]
    optional_components: tuple[str, ...] = ()
    packed: bool = False
    masked: bool = False            # text tokens carry a padding mask (rows may differ in length)
    default_tap: str = "transformer_blocks.-1"
    negative_prompt: str = ""
    max_sequence_length: int = 256
    cfg_renorm: bool = False        # Qwen-Image's true CFG rescales the guided velocity to the conditional's norm

    def latent_channels(self, config) -> int:
        if self.packed:
            return int(config.in_channels) // 4
        return int(config.out_channels or config.in_channels)

    def patch(self, config) -> int:
        return 2 if self.packed else int(config.patch_size)

    def encode(self, pipe, captions: list[str], device, max_sequence_length: int) -> list[dict]:
        """One dict of per-caption tensors per caption (text tokens ``(L_i, D)``, pooled vectors ``(P,)``)."""
        raise NotImplementedError

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance: torch.Tensor | None):
        """The model's prediction for snapgen inputs (``t`` in [0, 1], shape ``(B,)``), as ``(B, C, H, W)``."""
        raise NotImplementedError


class SD3(Family):
    name, transformer_class, pipeline_class = "sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3")   # T5; the pipeline feeds zeros without it

    def encode(self, pipe, captions, device, max_sequence_length):
        emb, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
        return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(emb, pooled)]

    def call(self, model, x, t, cond, guidance):
        return model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=t * 1000, return_dict=False)[0]


class Flux(Family):
    name, transformer_class, pipeline_class = "flux", "FluxTransformer2DModel", "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    packed, default_tap, max_sequence_length = True, "single_transformer_blocks.-1", 512

    def encode(self, pipe, captions, device, max_sequence_length):
        emb, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                            max_sequence_length=max_sequence_length)
        return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(emb, pooled)]

    def call(self, model, x, t, cond, guidance):
        B, C, H, W = x.shape
        ids = torch.zeros(H // 2, W // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] += torch.arange(H // 2, device=x.device, dtype=x.dtype)[:, None]
        ids[..., 2] += torch.arange(W // 2, device=x.device, dtype=x.dtype)[None, :]
        text = cond["encoder_hidden_states"]
        if model.config.guidance_embeds and guidance is None:
            raise ValueError("this Flux transformer is guidance-distilled (Flux-dev): set the teacher's "
                             "'guidance' (its embedded guidance scale, e.g. 3.5)")
        out = model(hidden_states=pack_latents(x), timestep=t, guidance=guidance if model.config.guidance_embeds
                    else None, pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                    img_ids=ids.reshape(-1, 3), return_dict=False)[0]
        return unpack_latents(out, H, W)


class QwenImage(Family):
    name, transformer_class, pipeline_class = "qwenimage", "QwenImageTransformer2DModel", "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    packed, masked, max_sequence_length, cfg_renorm = True, True, 1024, True
    negative_prompt = " "   # the Qwen-Image examples' negative prompt (an empty one enables true CFG)

    def encode(self, pipe, captions, device, max_sequence_length):
        emb, mask = pipe.encode_prompt(prompt=captions, device=device, max_sequence_length=max_sequence_length)
        lengths = mask.sum(1).tolist() if mask is not None else [emb.shape[1]] * len(captions)
        return [{"encoder_hidden_states": e[:int(n)]} for e, n in zip(emb, lengths)]  # valid tokens lead

    def call(self, model, x, t, cond, guidance):
        B, C, H, W = x.shape
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=cond["encoder_hidden_states"],
                    encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"), timestep=t,
                    img_shapes=[[(1, H // 2, W // 2)]] * B,
                    guidance=guidance if model.config.guidance_embeds else None, return_dict=False)[0]
        return unpack_latents(out, H, W)


FAMILIES: dict[str, Family] = {f.transformer_class: f for f in (SD3(), Flux(), QwenImage())}


def family_of(class_name: str | None, where: str = "") -> Family:
    if class_name not in FAMILIES:
        raise ValueError(f"{where or 'the teacher transformer'} is a {class_name!r}; a diffusers teacher must be "
                         f"one of {sorted(FAMILIES)} (SD3/SD3.5, Flux, Qwen-Image)")
    return FAMILIES[class_name]
