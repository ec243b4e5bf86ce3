"""Latent cache: a dataset encoded once (images by the autoencoder, captions by the frozen text encoder).

Diffusion training then reads tensors from memory instead of rendering, encoding images and running the
text encoder at every step (each of those costs as much as a training step of a small DiT on 2 cores).

File format (one safetensors file, written atomically):

- ``latents``        float32 ``(N, C, h, w)`` normalised latents (``autoencoder.encode_latents``, posterior mode)
- ``caption_index``  int64 ``(N,)`` row of each sample's caption in the tables below
- ``text_tokens``    float16 ``(U, L, D)`` features of the U distinct captions, zero-padded to L
- ``text_mask``      bool ``(U, L)``
- metadata: ``captions`` (JSON list of the U captions), ``spec`` (the dataset spec), ``num_samples``

Several text encoders (``text.encoder: [a, b]``): ``text_tokens_{i}`` / ``text_mask_{i}`` per encoder ``i`` (each
padded to its own L_i) instead of ``text_tokens`` / ``text_mask``, and ``text_encoders`` in the metadata (JSON list
of ``{"spec", "max_length", "dim"}``, in order). A one-encoder cache is the format above, unchanged.
``load_latent_cache`` returns ``text_features`` (one ``(tokens, mask)`` table per encoder) for both; a
trainer checks the encoders with :func:`check_cache_encoders`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .base import image_to_tensor

__all__ = ["build_latent_cache", "cache_features", "check_cache_encoders", "encoder_records", "load_latent_cache",
           "save_latent_cache"]


def save_latent_cache(path: str | os.PathLike, latents: torch.Tensor, caption_index: torch.Tensor,
                      text_tokens, text_mask, captions: list[str], spec: dict | None = None,
                      encoders: list[dict] | None = None) -> Path:
    """``text_tokens`` / ``text_mask``: one table each, or lists of one per encoder; with several encoders,
    ``encoders`` records them (:func:`encoder_records`) in the metadata."""
    from ..nn.io import atomic_save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = list(text_tokens) if isinstance(text_tokens, (list, tuple)) else [text_tokens]
    masks = list(text_mask) if isinstance(text_mask, (list, tuple)) else [text_mask]
    if len(tokens) != len(masks) or any(len(captions) != len(t) for t in tokens):
        raise ValueError("one caption per text_tokens row (and one text_mask per text_tokens table) is required")
    meta = {"captions": json.dumps(captions), "spec": json.dumps(spec or {}), "num_samples": str(len(latents))}
    tensors = {"latents": latents.float(), "caption_index": caption_index.long()}
    if len(tokens) == 1:  # the historical format, byte for byte
        tensors.update(text_tokens=tokens[0].half(), text_mask=masks[0].bool())
    else:
        if encoders is None or len(encoders) != len(tokens):
            raise ValueError(f"a cache of {len(tokens)} text encoders needs one encoders record per encoder")
        meta["text_encoders"] = json.dumps(encoders)
        for i, (t, m) in enumerate(zip(tokens, masks)):
            tensors[f"text_tokens_{i}"], tensors[f"text_mask_{i}"] = t.half(), m.bool()
    atomic_save_safetensors(tensors, path, metadata=meta)
    return path


def encoder_records(text_encoder) -> list[dict]:
    """``[{"spec", "max_length", "dim"}]`` of each encoder behind ``text_encoder`` (what a cache records)."""
    from ..text import encoder_list

    encoders = encoder_list(text_encoder)
    specs = getattr(text_encoder, "specs", None) or [getattr(e, "name", type(e).__name__) for e in encoders]
    lengths = [getattr(e, "max_length", None) for e in encoders]
    return [{"spec": s, "max_length": None if m is None else int(m), "dim": int(e.dim)}
            for s, m, e in zip(specs, lengths, encoders)]


def check_cache_encoders(cache: dict, path, specs: list[str], max_lengths: list[int]) -> None:
    """A one-line ``ValueError`` if the cache at ``path`` was not built with these encoders (several-encoder
    caches record specs and max lengths; a one-encoder cache only its count and width, checked by the caller)."""
    stored = cache.get("text_encoders")
    fix = "delete the cache (it is rebuilt) or set data.cache to another path"
    if len(cache["text_features"]) != len(specs):
        built = f" {[r['spec'] for r in stored]}" if stored else ""
        raise ValueError(f"latent cache {path} holds features of {len(cache['text_features'])} text encoder(s)"
                         f"{built} but text.encoder lists {len(specs)} {specs}; {fix}")
    if stored is None:
        return
    have = [(r["spec"], int(r["max_length"])) for r in stored]
    want = list(zip(specs, max_lengths))
    if have != want:
        raise ValueError(f"latent cache {path} was built with text encoders {have} (spec, max_length), the config "
                         f"asks for {want}; {fix}")


def cache_features(tables: list, rows: torch.Tensor, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The feature list (float32 tokens, bool mask per encoder) of caption ``rows`` of a loaded cache's
    ``text_features`` tables."""
    return [(t[rows].float().to(device), m[rows].to(device)) for t, m in tables]


@torch.no_grad()
def build_latent_cache(path: str | os.PathLike, spec: dict, autoencoder, text_encoder, num_samples: int,
                       batch_size: int = 64, text_batch_size: int = 256, progress: bool = True) -> Path:
    from .mixed import build_dataset

    dataset = build_dataset(spec)
    n = min(num_samples, len(dataset))
    latents, captions = [], []
    device = next(iter(autoencoder.parameters())).device if hasattr(autoencoder, "parameters") else "cpu"
    for start in tqdm(range(0, n, batch_size), desc="encoding images", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([image_to_tensor(s.image) for s in items]).to(device)
        latents.append(autoencoder.encode_latents(x).cpu())
        captions.extend(s.caption for s in items)
    from ..text import encode_features

    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    chunks = []  # per caption batch: one (tokens, mask) per encoder
    for start in tqdm(range(0, len(distinct), text_batch_size), desc="encoding captions", unit="batch",
                      disable=not progress):
        chunks.append([(t.cpu(), m.cpu()) for t, m in encode_features(text_encoder,
                                                                      distinct[start:start + text_batch_size])])
    text_tokens, text_mask = [], []
    for i in range(len(chunks[0])):
        feats, masks = [c[i][0] for c in chunks], [c[i][1] for c in chunks]
        L = max(t.shape[1] for t in feats)
        text_tokens.append(torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in feats]))
        text_mask.append(torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1]), value=False) for m in masks]))
    index = torch.tensor([row[c] for c in captions])
    encoders = encoder_records(text_encoder) if len(text_tokens) > 1 else None
    return save_latent_cache(path, torch.cat(latents), index, text_tokens, text_mask, distinct, spec, encoders)


def load_latent_cache(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent cache not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"latent cache {path} is corrupt ({e}); delete it and it will be rebuilt") from None
    encoders = json.loads(meta["text_encoders"]) if "text_encoders" in meta else None
    text_keys = [("text_tokens", "text_mask")] if encoders is None else \
        [(f"text_tokens_{i}", f"text_mask_{i}") for i in range(len(encoders))]
    need = {"latents", "caption_index", *(k for pair in text_keys for k in pair)}
    if not need <= set(tensors):
        raise ValueError(f"latent cache {path} lacks {sorted(need - set(tensors))}; delete it to rebuild")
    tensors["captions"] = json.loads(meta.get("captions", "[]"))
    tensors["spec"] = json.loads(meta.get("spec", "{}"))
    tensors["text_encoders"] = encoders
    tensors["text_features"] = [(tensors[t], tensors[m]) for t, m in text_keys]
    return tensors
