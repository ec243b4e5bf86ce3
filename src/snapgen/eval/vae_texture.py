""""Generator texture" for the scene detector (issue 20 §1, follow-up): real renders passed through the
shipped 64x64 autoencoder with Gaussian noise added to their latents, then decoded. This reproduces the
blotchy 4x4-block fill the shipped generator's imperfect latents give its objects, which the detector
trained on clean/degraded renders alone rejected as "not a shape" (``benchmarks/detector_latent_noise.py``).

* :func:`latent_noise_images` -- a batch of images -> VAE round trip with latent noise ``sigma`` (one per
  image), deterministic from a ``torch.Generator``.
* :func:`shipped_autoencoder` -- the autoencoder the shipped recipe uses (``models/snapgen-micro/vae``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import env

__all__ = ["latent_noise_images", "shipped_autoencoder"]


def shipped_autoencoder(directory: str | os.PathLike | None = None):
    """The shipped autoencoder (``<repo>/models/snapgen-micro/vae`` unless ``directory``), in eval mode."""
    from ..vae.diffusers_adapter import load_autoencoder

    path = Path(directory) if directory is not None else env.REPO_ROOT / "models" / "snapgen-micro" / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no autoencoder at {path} (generator texture needs the shipped VAE); pass "
                                f"its folder, or train the detector without generator texture (--vae-p 0)")
    return load_autoencoder(path).eval()


@torch.no_grad()
def latent_noise_images(vae, images: Sequence[Image.Image], sigmas: Sequence[float],
                        generator: torch.Generator, batch_size: int = 64) -> list[Image.Image]:
    """``images`` (same size, RGB) encoded by ``vae``, ``sigma * N(0, 1)`` added to each latent (``sigmas``
    one per image), decoded back to RGB images: the generator's texture on real objects."""
    if len(images) != len(sigmas):
        raise ValueError(f"{len(images)} images but {len(sigmas)} sigmas; pass one sigma per image")
    out: list[Image.Image] = []
    for a in range(0, len(images), batch_size):
        chunk = images[a:a + batch_size]
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1
                                       for im in chunk])).permute(0, 3, 1, 2)
        z = vae.encode_latents(x)
        s = torch.tensor(list(sigmas[a:a + batch_size]), dtype=z.dtype).view(-1, 1, 1, 1)
        y = vae.decode_latents(z + s * torch.randn(z.shape, generator=generator, dtype=z.dtype))
        y = ((y.float().permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        out.extend(Image.fromarray(v) for v in y)
    return out
