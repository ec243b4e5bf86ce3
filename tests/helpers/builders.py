"""Builders for the tiny models, inputs and pipelines that several test files share."""

import torch

from snapgen.models import ThreeStageDiT, preset
from snapgen.pipelines import PipelineConfig, TextToImagePipeline
from snapgen.text import TextConditioning
from snapgen.vae import Autoencoder, AutoencoderConfig

TEXT_DIM = 32      # the transformer's text_dim (nano's)
ENC_DIM = 16       # the (fake or tiny BERT) text encoder's width: TextConditioning projects 16 -> 32
SHIFT = 2.0        # the timestep shift of build_pipeline's PipelineConfig


def nano(**overrides):
    """The test configuration (a few hundred thousand parameters), optionally modified."""
    return preset("nano", **overrides)


def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised gates and outputs stop hiding the rest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def dummy_inputs(cfg, B=2, h=16, w=16, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, cfg.text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L // 2 + 1:] = False
    return x, t, text, mask


def make_qkv(N, heads=4, kv_heads=2, d=16, B=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, heads, d, generator=g, dtype=dtype)
    k = torch.randn(B, N, kv_heads, d, generator=g, dtype=dtype)
    v = torch.randn(B, N, kv_heads, d, generator=g, dtype=dtype)
    return q, k, v


def save_tiny_bert(directory, hidden: int, seed: int = 0):
    """A tiny random BERT (1 layer, ``hidden`` wide) with MiniLM's tokenizer: a real text encoder folder for
    pipelines that must be exported or loaded from pipeline.json."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from snapgen.text import minilm_path

    torch.manual_seed(seed)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=30522)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True).save_pretrained(directory)
    return directory


def build_pipeline(text_encoder_spec="minilm", text_encoder=None):
    """A tiny random text-to-image pipeline: perturbed nano DiT (text_dim 32), 2x VAE, ENC_DIM -> TEXT_DIM
    conditioning with a non-zero null embedding, 16x16, 3 steps, CFG 3, shift SHIFT."""
    torch.manual_seed(0)
    transformer = perturb_(ThreeStageDiT(nano(in_channels=4, vae_factor=2, text_dim=TEXT_DIM)), std=0.05)
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4,
                                        scaling_factor=0.7, shift_factor=0.1))
    cond_kw = {"encoder_dims": [ENC_DIM], "out_dim": TEXT_DIM}
    conditioning = TextConditioning(**cond_kw)
    with torch.no_grad():
        conditioning.null_embeddings[0].normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    config = PipelineConfig(text_encoder=text_encoder_spec, text_max_length=16, conditioning=cond_kw,
                            resolution=(16, 16), steps=3, guidance=3.0, shift=SHIFT)
    return TextToImagePipeline(transformer, conditioning, vae, config, text_encoder=text_encoder)


def build_elastic_pipeline(text_encoder_spec="minilm", text_encoder=None):
    """The same, with the nano-elastic supernetwork (variants tiny / small / full)."""
    torch.manual_seed(0)
    cfg = preset("nano-elastic", vae_factor=2, text_dim=TEXT_DIM)
    transformer = perturb_(ThreeStageDiT(cfg), std=0.05)
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    cond_kw = {"encoder_dims": [ENC_DIM], "out_dim": TEXT_DIM}
    config = PipelineConfig(text_encoder=text_encoder_spec, text_max_length=16, conditioning=cond_kw,
                            resolution=(16, 16), steps=3, guidance=3.0)
    return TextToImagePipeline(transformer, TextConditioning(**cond_kw), vae, config, text_encoder=text_encoder)


def build_distill_base(d):
    """A tiny elastic pipeline folder with a real tiny BERT and a latent cache: what the dmd / kdmd task tests
    distil (conftest's module fixture ``base``)."""
    from snapgen.models import ThreeStageDiT, preset
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.vae import Autoencoder, AutoencoderConfig

    from .runs import make_cache

    bert = save_tiny_bert(d / "bert", 32)  # a tiny real text encoder, so the distilled pipeline can be exported
    torch.manual_seed(0)
    model = perturb_(ThreeStageDiT(preset("nano-elastic", vae_factor=2)), std=0.05)
    kw = {"encoder_dims": [32], "out_dim": 32}
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    TextToImagePipeline(model, TextConditioning(**kw), vae,
                        PipelineConfig(text_encoder=str(bert), conditioning=kw, resolution=(16, 16), steps=6,
                                       guidance=3.0)).save_pretrained(d)
    make_cache(d / "cache.safetensors")
    return d


def fake_hub_snapshot(cache_dir, repo_id: str, folder, revision: str = "main", commit: str | None = None):
    """Copy ``folder`` into a Hugging Face cache laid out as ``huggingface_hub`` writes it --
    ``models--org--name/snapshots/<commit>/...`` and ``refs/<revision>`` holding the commit hash -- so that
    ``snapshot_download(repo_id, revision=revision, local_files_only=True)`` finds it. Returns the snapshot."""
    import hashlib
    import shutil
    from pathlib import Path

    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # 40 hex digits, like git
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


FEW_STEP_TIMES = (1.0, 0.9, 0.75, 0.5, 0.0)  # the 4 step times of build_distilled_pipeline


def build_distilled_pipeline(text_encoder=None):
    """build_elastic_pipeline made a distilled (few-step) pipeline without training: a trained-looking LoRA
    adapter (``dmd_full``, random non-zero update) for variant full, the few-step sampler on FEW_STEP_TIMES,
    guidance 1, and the base model's 3-step Euler sampler with CFG 3 for ``use_base()``."""
    from snapgen.nn.lora import add_lora, lora_parameters

    pipe = build_elastic_pipeline(text_encoder=text_encoder)
    add_lora(pipe.transformer, "dmd_full", rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(pipe.transformer, "dmd_full").values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    config = pipe.config.replace(sampler="few_step", steps=4, guidance=1.0, few_step_times=FEW_STEP_TIMES,
                                 adapters={"full": "dmd_full"},
                                 base_sampling={"sampler": "euler", "steps": 3, "guidance": 3.0, "shift": 1.0})
    return TextToImagePipeline(pipe.transformer, pipe.conditioning, pipe.vae, config,
                               text_encoder=text_encoder).set_variant("full")


def save_plain_nano_pipeline(directory, seed: int = 3):
    """A perturbed plain (non-elastic) nano ThreeStageDiT with 4 KV heads saved as a pipeline folder at
    ``directory`` (the source of an elastic warm start); returns the model."""
    from snapgen.models import ThreeStageDiT, preset
    from snapgen.pipelines import PipelineConfig, TextToImagePipeline
    from snapgen.text import TextConditioning
    from snapgen.vae import Autoencoder, AutoencoderConfig

    torch.manual_seed(seed)
    plain = perturb_(ThreeStageDiT(preset("nano-elastic").variant_config("full").replace(kv_heads=4)))
    cond_kw = {"encoder_dims": [32], "out_dim": 32, "drop_probs": [0.2], "null_length": 1}
    vae = Autoencoder(AutoencoderConfig(channels=(8, 8), latent_channels=4, groups=4))
    TextToImagePipeline(plain, TextConditioning(**cond_kw), vae,
                        PipelineConfig(conditioning=cond_kw)).save_pretrained(directory)
    return plain
