"""Real VAEs from a local folder through diffusers (an optional extra: ``pip install 'snapgen[diffusers]'``).

``DiffusersAutoencoder`` gives a diffusers VAE the same interface as snapgen's own
:class:`~snapgen.vae.Autoencoder` (``factor``, ``latent_channels``, ``encode_latents``, ``decode_latents``):
images ``(B, C, H, W)`` in [-1, 1] <-> the *normalised* latents ``(B, latent_channels, H/f, W/f)`` the diffusion
model sees, ``z_n = (z - shift) * scale`` per latent channel. Each class is normalised exactly as its own
diffusers pipeline does it (checked against diffusers 0.42's pipeline sources):

- ``AutoencoderKL`` (SD, SDXL, Flux): ``(z - shift_factor) * scaling_factor`` (scalars), or, when the config has
  ``latents_mean`` / ``latents_std`` (the SDXL pipelines' branch), ``(z - mean) * scaling_factor / std`` per
  channel. Factor ``2 ** (len(block_out_channels) - 1)``, ``latent_channels`` channels, 4-D.
- ``AutoencoderKLQwenImage`` (the Qwen-Image VAE of SnapGen++'s recipes): ``(z - latents_mean) / latents_std`` per
  channel (``QwenImagePipeline``). Factor ``2 ** len(temperal_downsample)`` (8 for the released VAE), ``z_dim``
  channels (16).
- ``AutoencoderKLWan`` (Wan 2.1 / 2.2): the same normalisation (``WanPipeline``); factor ``scale_factor_spatial``,
  ``z_dim`` channels; with ``patch_size`` (Wan 2.2) the image has ``in_channels / patch_size**2`` channels.

The factors are the ones the diffusers pipelines use (``vae_scale_factor``; for the 3-D classes also the model's
``spatial_compression_ratio``). The Qwen-Image and Wan VAEs are causal 3-D VAEs on ``(B, C, T, H, W)``: an image
goes in as one frame (``T = 1``, the frame axis added here and dropped again, as ``QwenImagePipeline`` does with
``unsqueeze(2)`` / ``[:, :, 0]``). Only images are adapted: a video goes through ``T = 1 + 4k`` frame chunks
(``_encode``) and its latents have another frame count, which the coming video family will handle.

Seeded posterior samples are drawn with :mod:`snapgen.utils.random` (on the generator's device, then moved).
The normalisation buffers move with ``.to()``; the arithmetic is done in fp32 and cast back to the VAE's dtype.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..nn.hub import resolve_pretrained
from ..nn.io import CONFIG_NAME
from ..utils.quiet import quiet_imports
from ..utils.random import randn

__all__ = ["DIFFUSERS_CLASSES", "DiffusersAutoencoder", "load_autoencoder"]


@dataclass(frozen=True)
class _Layout:
    """How one diffusers VAE class is read: its sizes and its latent normalisation, from its config."""

    frames: bool                                      # 5-D (B, C, T, H, W) model: images go in as T = 1
    factor: Callable[[dict], int]
    latent_channels: Callable[[dict], int]
    image_channels: Callable[[dict], int]
    normalisation: Callable[[dict, int, str], tuple[list[float], list[float]]]   # (cfg, C, name) -> shift, scale


def _per_channel(cfg: dict, C: int, name: str) -> tuple[list[float], list[float]]:
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is None or std is None:
        missing = [k for k, v in (("latents_mean", mean), ("latents_std", std)) if v is None]
        raise ValueError(f"{name} config has no {' / '.join(missing)}: the per-channel latent normalisation "
                         f"needs both latents_mean and latents_std with {C} values each (the folder is incomplete)")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != C or len(std) != C:
        raise ValueError(f"{name} config has {len(mean)} latents_mean and {len(std)} latents_std values for "
                         f"{C} latent channels; they must have one value per channel")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"{name} config's latents_std must be finite and > 0 and latents_mean finite, "
                         f"got mean {mean}, std {std}")
    return mean, std


def _kl_normalisation(cfg: dict, C: int, name: str) -> tuple[list[float], list[float]]:
    """AutoencoderKL: scalar ``(z - shift_factor) * scaling_factor`` (SD, Flux), or per channel
    ``(z - latents_mean) * scaling_factor / latents_std`` when the config has them (SDXL pipelines)."""
    sf = float(cfg.get("scaling_factor") or 1.0)
    if not (math.isfinite(sf) and sf > 0):
        raise ValueError(f"{name} config's scaling_factor must be finite and > 0, got {sf}")
    if cfg.get("latents_mean") is None and cfg.get("latents_std") is None:
        return [float(cfg.get("shift_factor") or 0.0)] * C, [sf] * C
    if cfg.get("shift_factor"):
        raise ValueError(f"{name} config sets both shift_factor and latents_mean/latents_std; no diffusers "
                         f"pipeline combines them, so the normalisation is ambiguous: remove one of the two")
    mean, std = _per_channel(cfg, C, name)
    return mean, [sf / s for s in std]


def _qwen_wan_normalisation(cfg: dict, C: int, name: str) -> tuple[list[float], list[float]]:
    """Qwen-Image / Wan: ``(z - latents_mean) / latents_std`` per channel (no scaling_factor)."""
    mean, std = _per_channel(cfg, C, name)
    return mean, [1.0 / s for s in std]


def _patched(cfg: dict, key: str) -> int:
    return int(cfg[key]) // int(cfg.get("patch_size") or 1) ** 2   # Wan 2.2 patchifies the RGB input first


DIFFUSERS_CLASSES: dict[str, _Layout] = {
    "AutoencoderKL": _Layout(
        frames=False, factor=lambda c: 2 ** (len(c["block_out_channels"]) - 1),
        latent_channels=lambda c: int(c["latent_channels"]), image_channels=lambda c: int(c["in_channels"]),
        normalisation=_kl_normalisation),
    "AutoencoderKLQwenImage": _Layout(
        frames=True, factor=lambda c: 2 ** len(c["temperal_downsample"]),
        latent_channels=lambda c: int(c["z_dim"]), image_channels=lambda c: int(c["input_channels"]),
        normalisation=_qwen_wan_normalisation),
    "AutoencoderKLWan": _Layout(
        frames=True, factor=lambda c: int(c["scale_factor_spatial"]),
        latent_channels=lambda c: int(c["z_dim"]), image_channels=lambda c: _patched(c, "in_channels"),
        normalisation=_qwen_wan_normalisation),
}


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(config, dict):
        raise ValueError(  # noqa: TRY004 - a corrupt file, like invalid JSON
            f"{path} must hold a JSON object, got {type(config).__name__}; the file is corrupt")
    return config


def _supported() -> str:
    return ", ".join(f"'{k}'" for k in DIFFUSERS_CLASSES)


class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers VAE (one of :data:`DIFFUSERS_CLASSES`) behind snapgen's autoencoder interface."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        name = type(vae).__name__
        if name not in DIFFUSERS_CLASSES:
            raise TypeError(f"DiffusersAutoencoder adapts the diffusers classes {_supported()}, got {name}")
        self.vae = vae.eval().requires_grad_(False)
        layout = self.layout = DIFFUSERS_CLASSES[name]
        cfg = dict(vae.config)
        self.class_name = name
        self.factor = layout.factor(cfg)
        self.latent_channels = layout.latent_channels(cfg)
        self.image_channels = layout.image_channels(cfg)
        shift, scale = layout.normalisation(cfg, self.latent_channels, name)
        # per-channel (C,) buffers: they follow .to(); not saved (the folder's config.json holds them)
        self.register_buffer("latents_shift", torch.tensor(shift, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DiffusersAutoencoder":
        """Load a folder saved by one of :data:`DIFFUSERS_CLASSES` (``local_files_only``: never the network),
        or a Hugging Face Hub id holding one (:func:`snapgen.nn.hub.resolve_pretrained`); the class is the one
        its ``config.json`` names."""
        directory = resolve_pretrained(directory, "diffusers VAE", f"a folder saved by one of {_supported()} "
                                                                   f"with save_pretrained")
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no diffusers VAE at {directory}: expected config.json and "
                                    f"diffusion_pytorch_model.safetensors (a folder saved by one of "
                                    f"{_supported()} with save_pretrained)")
        name = _read_config(directory / CONFIG_NAME).get("_class_name")
        if name not in DIFFUSERS_CLASSES:
            raise ValueError(f"{directory / CONFIG_NAME} describes {name!r}; the diffusers VAEs snapgen loads "
                             f"are {_supported()}")
        try:
            with quiet_imports():
                import diffusers
        except ImportError:
            raise ImportError(f"loading a diffusers {name} needs diffusers: pip install 'snapgen[diffusers]'") \
                from None
        if not hasattr(diffusers, name):
            raise ImportError(f"diffusers {diffusers.__version__} has no {name}; upgrade it: "
                              f"pip install -U 'snapgen[diffusers]'")
        with quiet_imports():
            return cls(getattr(diffusers, name).from_pretrained(directory, local_files_only=True,
                                                                use_safetensors=True))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.float().view(1, -1, 1, 1)  # per channel, broadcast over H, W

    def _check(self, x: torch.Tensor, channels: int, what: str, spatial: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{self.class_name} {what} must be (B, {channels}, H, W), got {tuple(x.shape)}"
                             + ("; the frame axis of this 3-D VAE is added inside (images only)"
                                if self.layout.frames and x.dim() == 5 else ""))
        if spatial > 1 and (x.shape[-2] % spatial or x.shape[-1] % spatial):
            f = spatial
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} must be a multiple of the autoencoder "
                             f"factor {f}; resize or crop to e.g. {x.shape[-2] // f * f or f}x"
                             f"{x.shape[-1] // f * f or f}")

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] -> normalised latents ``(B, latent_channels, H/f, W/f)``
        (the posterior mode, or a sample drawn from ``generator``)."""
        self._check(x, self.image_channels, "images", self.factor)
        h = x.to(self.dtype)
        dist = self.vae.encode(h.unsqueeze(2) if self.layout.frames else h).latent_dist
        z = dist.mode()
        if sample:
            z = z + dist.std * randn(z.shape, generator, device=z.device, dtype=z.dtype)
        if self.layout.frames:
            z = z[:, :, 0]
        if z.shape[-2:] != (x.shape[-2] // self.factor, x.shape[-1] // self.factor):
            raise ValueError(f"{self.class_name} encoded {tuple(x.shape[-2:])} to {tuple(z.shape[-2:])}, not the "
                             f"factor {self.factor} its config gives; the config disagrees with the network")
        return ((z.float() - self._view(self.latents_shift)) * self._view(self.latents_scale)).to(z.dtype)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, latent_channels, h, w)`` -> images ``(B, C, h*f, w*f)``."""
        self._check(z, self.latent_channels, "latents", 1)
        raw = (z.float() / self._view(self.latents_scale) + self._view(self.latents_shift)).to(self.dtype)
        if self.layout.frames:
            return self.vae.decode(raw.unsqueeze(2)).sample[:, :, 0]
        return self.vae.decode(raw).sample


def load_autoencoder(directory: str | os.PathLike):
    """snapgen's Autoencoder or a diffusers VAE (:data:`DIFFUSERS_CLASSES`), told apart by the folder's
    config.json ``_class_name``; ``directory`` may be a Hugging Face Hub id holding such a folder
    (:func:`snapgen.nn.hub.resolve_pretrained`)."""
    from .autoencoder import Autoencoder

    directory = resolve_pretrained(directory, "autoencoder", "a folder written by Autoencoder.save_pretrained or "
                                                             "a diffusers VAE's save_pretrained")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"autoencoder folder {directory} has no {CONFIG_NAME}; pass a folder written by "
                                f"Autoencoder.save_pretrained or a diffusers VAE's save_pretrained "
                                f"({_supported()})")
    kind = _read_config(cfg_path).get("_class_name")
    if kind in DIFFUSERS_CLASSES:
        return DiffusersAutoencoder.from_pretrained(directory)
    if kind == "Autoencoder":
        return Autoencoder.from_pretrained(directory)
    raise ValueError(f"{cfg_path} describes {kind!r}, not an autoencoder snapgen can load "
                     f"(snapgen 'Autoencoder' or the diffusers VAEs {_supported()})")
