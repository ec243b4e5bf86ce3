"""Per-caption memo of a frozen encoder's features, saved as one safetensors file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..nn.io import atomic_save_safetensors
from .base import TextEncoder, check_captions

__all__ = ["CachedTextEncoder"]

_FORMAT = "snapgen.text_cache.v1"


class CachedTextEncoder(TextEncoder):
    """Memoises ``encoder.encode`` per caption.

    Each caption's valid tokens (``tokens[b, mask[b]]``, trimmed of padding) are stored once, on the CPU,
    in ``dtype``; ``encode`` re-pads them per batch on the right, exactly as the encoder would, and
    returns float32 CPU tensors. Only captions not yet in the cache reach the wrapped encoder (in chunks
    of ``batch_size``, duplicates encoded once).

    Accuracy: results equal the uncached ones up to fp16 rounding when ``dtype`` is float16 (relative
    error <= 2**-11, about 5e-4 of each value; bfloat16: 4e-3), and exactly for float32 when the caption
    was encoded in the same batch. A caption encoded in another batch (with other padding) differs only by
    the encoder's float noise from batch padding: for right-padded, attention-masked encoders such as
    MiniLM about 1e-6 (the tests check 1e-5), far below fp16 rounding.

    ``save(path)`` writes one safetensors file (atomic: temporary file + ``os.replace``): all tokens
    concatenated in ``tokens`` (N_tokens, dim), per-caption ``lengths``, and the captions as UTF-8 JSON in
    a ``captions`` uint8 tensor (not in the header metadata, which safetensors caps at 100 MB); the header
    metadata records the encoder's name, dim and max_length, checked by ``load``.
    """

    def __init__(self, encoder: TextEncoder, dtype: torch.dtype = torch.float16, batch_size: int = 256):
        super().__init__()
        if not isinstance(encoder, TextEncoder):
            if hasattr(encoder, "encoders") and hasattr(encoder, "specs"):  # a MultiTextEncoder: cache each encoder
                raise TypeError("CachedTextEncoder wraps one text encoder; cache several by wrapping each: "
                                "MultiTextEncoder([CachedTextEncoder(e) for e in multi.encoders], multi.specs)")
            raise TypeError(f"CachedTextEncoder wraps a snapgen.text.TextEncoder, "
                            f"got {type(encoder).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.encoder = encoder
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.name = encoder.name
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, caption: str) -> bool:
        return caption in self._cache

    def _fill(self, captions: list[str], batch_size: int, progress: bool = False) -> int:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if not missing:
            return 0
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(missing), desc=f"encoding captions ({self.name})", unit="caption")
        try:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                tokens, mask = self.encoder.encode(chunk)
                tokens, mask = tokens.cpu(), mask.cpu()
                for b, caption in enumerate(chunk):
                    self._cache[caption] = tokens[b, mask[b]].to(self.dtype).clone()
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return len(missing)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self._fill(captions, self.batch_size)
        rows = [self._cache[c] for c in captions]
        L = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), L, self.dim, dtype=torch.float32)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for b, r in enumerate(rows):
            tokens[b, :r.shape[0]] = r.to(torch.float32)
            mask[b, :r.shape[0]] = True
        return tokens, mask

    def precompute(self, captions: list[str], batch_size: int = 256, progress: bool = True) -> int:
        """Encode every caption not cached yet (tqdm bar); returns how many were newly encoded."""
        captions = check_captions(captions)
        with torch.no_grad():
            return self._fill(captions, int(batch_size), progress=progress)

    def _metadata(self) -> dict[str, str]:
        return {"format": _FORMAT, "encoder": self.name, "dim": str(self.dim),
                "max_length": str(self.max_length), "dtype": str(self.dtype).removeprefix("torch.")}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` (a ``.safetensors`` file), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = list(self._cache)
        rows = [self._cache[c] for c in captions]
        tokens = torch.cat(rows, 0) if rows else torch.zeros(0, self.dim, dtype=self.dtype)
        lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
        blob = torch.frombuffer(bytearray(json.dumps(captions, ensure_ascii=False).encode("utf-8")),
                                dtype=torch.uint8)
        atomic_save_safetensors({"tokens": tokens, "lengths": lengths, "captions": blob}, path,
                                metadata=self._metadata())
        return path

    def load(self, path: str | os.PathLike, strict: bool = True) -> CachedTextEncoder:
        """Add the captions cached in ``path`` (entries already here are overwritten). Returns ``self``.

        Raises ``ValueError`` if the file was written for another encoder (name, dim or max_length
        differ); ``strict=False`` accepts a different name (same dim and max_length).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text feature cache not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a snapgen text feature cache "
                                 f"(format {meta.get('format')!r})")
            mine = self._metadata()
            for key in ("dim", "max_length") + (("encoder",) if strict else ()):
                if meta.get(key) != mine[key]:
                    raise ValueError(f"{path} was written for encoder {meta.get('encoder')!r} with dim "
                                     f"{meta.get('dim')}, max_length {meta.get('max_length')}; this cache "
                                     f"wraps {mine['encoder']!r} with dim {mine['dim']}, "
                                     f"max_length {mine['max_length']}")
            tokens = f.get_tensor("tokens")
            lengths = f.get_tensor("lengths").tolist()
            captions = json.loads(bytes(f.get_tensor("captions").numpy()).decode("utf-8"))
        if len(captions) != len(lengths) or sum(lengths) != tokens.shape[0]:
            raise ValueError(f"{path} is corrupt: {len(captions)} captions, {len(lengths)} lengths, "
                             f"{tokens.shape[0]} tokens (lengths sum to {sum(lengths)})")
        for caption, rows in zip(captions, torch.split(tokens, lengths, 0)):
            self._cache[caption] = rows.to(self.dtype).clone()
        return self
