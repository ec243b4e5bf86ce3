"""What every snapgen data source returns, and the image <-> tensor conversion used everywhere.

A data source is a ``torch.utils.data.Dataset`` whose items are :class:`Sample` objects: an RGB
``PIL.Image`` at the source's resolution, its caption, and source-specific metadata (the scene
description for procedural scenes, the emoji code points for emoji, the file path for folders).
Keeping items as PIL images (not tensors) lets one source feed the autoencoder trainer, the latent
cache and the evaluators without each re-implementing resizing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["Sample", "image_to_tensor", "tensor_to_image", "center_crop_resize"]


@dataclass
class Sample:
    image: Image.Image                 # RGB, size (W, H) = the source's resolution
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] -> RGB PIL image (values outside the range are clipped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(arr.cpu().numpy(), "RGB")


def center_crop_resize(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize (Lanczos). ``size`` is an int or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    iw, ih = image.size
    scale = max(w / iw, h / ih)
    cw, ch = round(w / scale), round(h / scale)
    left, top = (iw - cw) // 2, (ih - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)
