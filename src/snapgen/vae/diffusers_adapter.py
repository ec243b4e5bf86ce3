"""Real VAEs from a local folder through diffusers (an optional extra: ``pip install 'snapgen[diffusers]'``).

``DiffusersAutoencoder`` gives ``diffusers.AutoencoderKL`` the same interface as snapgen's own
:class:`~snapgen.vae.Autoencoder` (``factor``, ``latent_channels``, ``encode_latents``,
``decode_latents``), applying the model's own ``scaling_factor``/``shift_factor`` from its config.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from ..nn.hub import resolve_pretrained
from ..nn.io import CONFIG_NAME
from ..utils.quiet import quiet_imports

__all__ = ["DiffusersAutoencoder", "load_autoencoder"]


class DiffusersAutoencoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DiffusersAutoencoder":
        """Load a local ``AutoencoderKL`` folder (``local_files_only``: never the network)."""
        try:
            with quiet_imports():
                from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("loading a diffusers AutoencoderKL needs diffusers: pip install 'snapgen[diffusers]'") \
                from None
        directory = resolve_pretrained(directory, "diffusers VAE",
                                       "a folder saved by AutoencoderKL.save_pretrained")
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no diffusers VAE at {directory}: expected config.json and "
                                    f"diffusion_pytorch_model.safetensors (a folder saved by AutoencoderKL)")
        with quiet_imports():
            return cls(AutoencoderKL.from_pretrained(directory, local_files_only=True, use_safetensors=True))

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample


def load_autoencoder(directory: str | os.PathLike):
    """snapgen's Autoencoder or a diffusers AutoencoderKL, told apart by the folder's config.json; ``directory``
    may be a Hugging Face Hub id holding such a folder (:func:`snapgen.nn.hub.resolve_pretrained`)."""
    from .autoencoder import Autoencoder

    directory = resolve_pretrained(directory, "autoencoder", "a folder written by Autoencoder.save_pretrained or "
                                                             "diffusers' AutoencoderKL.save_pretrained")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"autoencoder folder {directory} has no {CONFIG_NAME}; pass a folder written by "
                                f"Autoencoder.save_pretrained or diffusers' AutoencoderKL.save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(config, dict):
        raise ValueError(  # noqa: TRY004 - a corrupt file, like invalid JSON
            f"{cfg_path} must hold a JSON object, got {type(config).__name__}; the file is corrupt")
    kind = config.get("_class_name")
    if kind == "AutoencoderKL":
        return DiffusersAutoencoder.from_pretrained(directory)
    if kind == "Autoencoder":
        return Autoencoder.from_pretrained(directory)
    raise ValueError(f"{cfg_path} describes {kind!r}, not an autoencoder snapgen can load "
                     f"(snapgen 'Autoencoder' or diffusers 'AutoencoderKL')")
