"""Fakes that stand in for real components (no model is loaded)."""

import zlib

import torch
from helpers.builders import ENC_DIM

from snapgen.text import TextEncoder


class FakeEncoder(TextEncoder):
    """One fixed random vector per word (seeded by its CRC), right-padded; no model is loaded."""

    dim = ENC_DIM
    max_length = 8
    name = "fake"

    def _encode(self, captions):
        words = [c.split()[: self.max_length] or ["<empty>"] for c in captions]
        L = max(len(w) for w in words)
        tokens = torch.zeros(len(captions), L, self.dim)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                tokens[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        return tokens, mask
