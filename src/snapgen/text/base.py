"""The interface shared by every frozen text encoder."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

__all__ = ["TextEncoder", "check_captions"]


def check_captions(captions) -> list[str]:
    """Validate a batch of captions: a non-empty list (or tuple) of ``str``. Returns it as a list."""
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got a single str; wrap it: encode([caption])")
    try:
        captions = list(captions)
    except TypeError:
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}") from None
    if not captions:
        raise ValueError("captions is empty: encode needs at least one caption")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"captions must all be str, but captions[{i}] is {type(c).__name__}: {c!r:.80}")
    return captions


class TextEncoder(nn.Module):
    """A frozen caption encoder: ``encode(captions) -> (tokens, mask)``.

    * ``tokens``: float32 ``(B, L, dim)``; ``mask``: bool ``(B, L)``, True for real tokens. Padding is on
      the right; padded positions are exactly zero. ``L`` is the longest caption of the batch after
      truncation at ``max_length`` (so it depends on the batch, never exceeds ``max_length``).
    * Runs under ``torch.no_grad()``; nothing here is trainable. Trainable text-side parts (null
      embeddings, projections) live in :class:`snapgen.text.TextConditioning`, so frozen features can be
      cached per caption (:class:`snapgen.text.CachedTextEncoder`).

    Subclasses set ``dim``, ``max_length`` and ``name`` and implement :meth:`_encode`; the base class
    validates the captions, disables autograd, casts to float32 and zeroes padding.
    """

    dim: int
    max_length: int
    name: str

    @abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a validated, non-empty list of captions (autograd already off)."""

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = check_captions(captions)
        with torch.no_grad():
            tokens, mask = self._encode(captions)
            if tokens.dim() != 3 or tokens.shape[0] != len(captions) or tokens.shape[2] != self.dim:
                raise RuntimeError(f"{type(self).__name__}._encode returned tokens of shape "
                                   f"{tuple(tokens.shape)}, expected ({len(captions)}, L, {self.dim})")
            if tuple(mask.shape) != tuple(tokens.shape[:2]):
                raise RuntimeError(f"{type(self).__name__}._encode returned mask of shape "
                                   f"{tuple(mask.shape)} for tokens {tuple(tokens.shape)}")
            mask = mask.to(torch.bool)
            tokens = tokens.to(torch.float32).masked_fill(~mask[..., None], 0.0)
        return tokens, mask

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"name={getattr(self, 'name', '?')!r}, dim={getattr(self, 'dim', '?')}, " \
               f"max_length={getattr(self, 'max_length', '?')}"
