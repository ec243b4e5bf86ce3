"""Latent cache: a dataset encoded once (images by the autoencoder, captions by the frozen text encoder).

Diffusion training then reads tensors from memory instead of rendering, encoding images and running the
text encoder at every step (each of those costs as much as a training step of a small DiT on 2 cores).

File format (one safetensors file, written atomically):

- ``latents``        float32 ``(N, C, h, w)`` normalised latents (``autoencoder.encode_latents``, posterior mode)
- ``caption_index``  int64 ``(N,)`` row of each sample's caption in the tables below
- ``text_tokens``    float16 ``(U, L, D)`` features of the U distinct captions, zero-padded to L
- ``text_mask``      bool ``(U, L)``
- metadata: ``captions`` (JSON list of the U captions), ``spec`` (the dataset spec), ``num_samples``
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

__all__ = ["build_latent_cache", "load_latent_cache", "save_latent_cache"]


def save_latent_cache(path: str | os.PathLike, latents: torch.Tensor, caption_index: torch.Tensor,
                      text_tokens: torch.Tensor, text_mask: torch.Tensor, captions: list[str],
                      spec: dict | None = None) -> Path:
    from ..nn.io import atomic_save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(captions) != len(text_tokens):
        raise ValueError("one caption per text_tokens row is required")
    meta = {"captions": json.dumps(captions), "spec": json.dumps(spec or {}), "num_samples": str(len(latents))}
    atomic_save_safetensors({"latents": latents.float(), "caption_index": caption_index.long(),
                             "text_tokens": text_tokens.half(), "text_mask": text_mask.bool()}, path, metadata=meta)
    return path


@torch.no_grad()
def build_latent_cache(path: str | os.PathLike, spec: dict, autoencoder, text_encoder, num_samples: int,
                       batch_size: int = 64, text_batch_size: int = 256) -> Path:
    from .mixed import build_dataset

    dataset = build_dataset(spec)
    n = min(num_samples, len(dataset))
    latents, captions = [], []
    device = next(iter(autoencoder.parameters())).device if hasattr(autoencoder, "parameters") else "cpu"
    for start in tqdm(range(0, n, batch_size), desc="encoding images", unit="batch"):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([image_to_tensor(s.image) for s in items]).to(device)
        latents.append(autoencoder.encode_latents(x).cpu())
        captions.extend(s.caption for s in items)
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    feats, masks = [], []
    for start in tqdm(range(0, len(distinct), text_batch_size), desc="encoding captions", unit="batch"):
        tok, m = text_encoder.encode(distinct[start:start + text_batch_size])
        feats.append(tok.cpu())
        masks.append(m.cpu())
    L = max(t.shape[1] for t in feats)
    text_tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in feats])
    text_mask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1]), value=False) for m in masks])
    index = torch.tensor([row[c] for c in captions])
    return save_latent_cache(path, torch.cat(latents), index, text_tokens, text_mask, distinct, spec)


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
    need = {"latents", "caption_index", "text_tokens", "text_mask"}
    if not need <= set(tensors):
        raise ValueError(f"latent cache {path} lacks {sorted(need - set(tensors))}; delete it to rebuild")
    tensors["captions"] = json.loads(meta.get("captions", "[]"))
    tensors["spec"] = json.loads(meta.get("spec", "{}"))
    return tensors
