"""A small convolutional VAE for snapgen's latent space, trained here (no VAE weights exist offline).

Layout (SD-VAE style, much narrower): ``conv_in -> [ResBlock x n, stride-2 conv] per level -> ResBlock ->
GroupNorm/SiLU -> conv -> (mean, logvar)``; the decoder mirrors it with nearest upsampling + conv. The
downsampling factor is ``2 ** (len(channels) - 1)``.

Latents handed to the diffusion model are *normalised*: ``z_n = (z - shift) * scale`` with ``shift``
and ``scale`` measured on training data after the autoencoder is trained (unit variance, zero mean:
the flow's noise then has the same scale as the data), stored in the config.

Tiny decoder (SnapGen's on-device idea): ``decoder_channels`` may be narrower than the encoder's; a
tiny decoder is trained against a frozen encoder (see ``snapgen.train`` task ``autoencoder`` with
``freeze_encoder``), so it decodes the same latents the diffusion model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.io import ModelIOMixin
from ..utils.config import JSONConfigMixin
from ..utils.random import randn

__all__ = ["AutoencoderConfig", "Autoencoder", "DiagonalGaussian"]


@dataclass(frozen=True)
class AutoencoderConfig(JSONConfigMixin):
    _config_kind = "Autoencoder"

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 64)            # encoder width per level; factor = 2**(levels-1)
    decoder_channels: tuple[int, ...] | None = None      # None = same as the encoder (reversed use)
    blocks_per_level: int = 1
    groups: int = 8                                      # GroupNorm groups
    scaling_factor: float = 1.0                          # latent normalisation, measured after training
    shift_factor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.decoder_channels is not None:
            object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        dec = self.decoder_channels or self.channels
        if len(self.channels) < 1 or len(dec) != len(self.channels):
            raise ValueError(f"invalid AutoencoderConfig: channels {self.channels} and decoder_channels "
                             f"{self.decoder_channels} must be non-empty and have the same number of levels")
        for c in (*self.channels, *dec):
            if c <= 0 or c % self.groups:
                raise ValueError(f"invalid AutoencoderConfig: every width must be a positive multiple of "
                                 f"groups={self.groups}, got {c}")
        if self.latent_channels <= 0 or self.in_channels <= 0 or self.blocks_per_level < 1:
            raise ValueError("invalid AutoencoderConfig: channel counts and blocks_per_level must be positive")
        if self.scaling_factor <= 0:
            raise ValueError(f"invalid AutoencoderConfig: scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn(self.mean.shape, generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over latent elements, per sample."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = ch[0]
        for i, co in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(c, co, g))
                c = co
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(ResBlock(c, c, g))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.decoder_channels or cfg.channels)), cfg.groups
        c = ch[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(c, c, g)]
        for i, co in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(c, co, g))
                c = co
            if i < len(ch) - 1:
                layers.append(Upsample(c))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class Autoencoder(ModelIOMixin, nn.Module):
    """Images in [-1, 1] ``(B, 3, H, W)`` <-> latents ``(B, latent_channels, H/f, W/f)``.

    ``encode``/``decode`` work on raw latents; ``encode_latents``/``decode_latents`` on the normalised
    latents the diffusion model sees (use these in pipelines).
    """

    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"Autoencoder takes an AutoencoderConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _check_image(self, x: torch.Tensor) -> None:
        f = self.factor
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} must be a multiple of the autoencoder "
                             f"factor {f}; resize or crop to e.g. {x.shape[-2] // f * f or f}x"
                             f"{x.shape[-1] // f * f or f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check_image(x)
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruction and the posterior (for the training loss)."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return self.decode(z), post

    # --- normalised latents (what the diffusion model sees) -------------------------------------------
    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.config.scaling_factor + self.config.shift_factor)
