"""Several frozen text encoders side by side (SnapGen++ concatenates two encoders' token sequences).

The one interface every consumer of caption features uses (latent cache, trainer, pipeline) is a *feature
list*: ``[(tokens_0, mask_0), (tokens_1, mask_1), ...]``, one pair per encoder, in the configured order --
exactly what :class:`snapgen.text.TextConditioning` takes. :func:`encode_features` gives it for a single
:class:`~snapgen.text.TextEncoder` (a list of one pair: its ``encode`` unchanged) or a
:class:`MultiTextEncoder` (one pair per encoder).

Config form (``text.encoder`` of a flow run, ``text_encoder`` of ``pipeline.json``): one spec string (one
encoder, the historical form) or a list of specs; :func:`text_specs` normalises both, with
``max_length`` one int for all or one per encoder.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiTextEncoder", "encode_features", "encoder_list", "text_specs"]


def text_specs(spec, max_length=32, where: str = "text.encoder") -> tuple[list[str], list[int]]:
    """``(specs, max_lengths)`` from one spec or a list of them, and one max length or one per encoder."""
    specs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
    if not specs or any(not isinstance(s, str) or not s for s in specs):
        raise ValueError(f"{where} must be an encoder spec (minilm, a folder, onnx:PATH) or a non-empty list of "
                         f"them, got {spec!r}")
    lengths = [max_length] * len(specs) if not isinstance(max_length, (list, tuple)) else list(max_length)
    if len(lengths) != len(specs):
        raise ValueError(f"got {len(lengths)} max lengths for {len(specs)} text encoders; give one int for all "
                         f"or one per encoder")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in lengths):
        raise ValueError(f"text max_length must be a positive int (or a list of them), got {max_length!r}")
    return specs, [int(m) for m in lengths]


class MultiTextEncoder(nn.Module):
    """Frozen encoders run one after the other on the same captions: ``encode(captions)`` returns one
    ``(tokens, mask)`` per encoder (each exactly that encoder's own ``encode``), in the order given.

    ``specs``: what each encoder was loaded from (recorded in latent caches and pipeline folders); default
    the encoders' names."""

    def __init__(self, encoders, specs: list[str] | None = None):
        super().__init__()
        encoders = list(encoders)
        if not encoders:
            raise ValueError("MultiTextEncoder needs at least one encoder")
        self.encoders = nn.ModuleList(encoders)
        self.specs = list(specs) if specs is not None else [e.name for e in encoders]
        if len(self.specs) != len(encoders):
            raise ValueError(f"got {len(self.specs)} specs for {len(encoders)} encoders")

    def __len__(self) -> int:
        return len(self.encoders)

    @property
    def dims(self) -> list[int]:
        return [int(e.dim) for e in self.encoders]

    @property
    def max_lengths(self) -> list[int]:
        return [int(e.max_length) for e in self.encoders]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.encoders]

    def train(self, mode: bool = True):
        super().train(mode)
        for e in self.encoders:
            e.train(mode)  # each encoder keeps its wrapped model in eval mode
        return self

    def encode(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [e.encode(captions) for e in self.encoders]

    def forward(self, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"specs={self.specs}"


def encoder_list(encoder) -> list:
    """The single encoders behind ``encoder`` (itself, or a :class:`MultiTextEncoder`'s encoders)."""
    return list(encoder.encoders) if isinstance(encoder, MultiTextEncoder) else [encoder]


def encode_features(encoder, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The feature list of ``captions``: one ``(tokens, mask)`` per encoder of ``encoder``."""
    if isinstance(encoder, MultiTextEncoder):
        return encoder.encode(captions)
    return [encoder.encode(captions)]
