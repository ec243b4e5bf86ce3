import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from snapgen.models import ThreeStageDiT, preset  # noqa: E402


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


@pytest.fixture
def nano_model():
    torch.manual_seed(0)
    return ThreeStageDiT(nano())


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

