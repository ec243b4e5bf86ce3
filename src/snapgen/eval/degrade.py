"""Image degradations as generated images tend to show them (blur, resampling, noise, JPEG, colour
jitter): the scene detector's training augmentation and the settings its accuracy is reported under
(:mod:`snapgen.eval.detector`; split out of it for issue 20)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["DEGRADATIONS", "DEGRADED", "degrade_image"]


def degrade_image(image: Image.Image, rng: np.random.Generator, blur: float | None = None,
                  noise: float | None = None, jpeg: int | None = None, jitter: float | None = None,
                  resample: float | None = None) -> Image.Image:
    """A degraded copy of ``image``, as generated images tend to look.

    Arguments set each degradation exactly (0 / None-with-rng as below); ``None`` draws it from ``rng``:
    ``blur`` = Gaussian sigma in pixels at 64 px (scaled with the image; random: U(0, 1.6) half the time),
    ``resample`` = downscale factor then back up (random: U(1, 2) a quarter of the time, else 1),
    ``noise`` = Gaussian noise std in 0-255 levels (random: U(0, 16)), ``jpeg`` = JPEG quality (random:
    U(30, 95) a third of the time, else none; 0 = none), ``jitter`` = strength of the colour jitter
    (random U(0, 1); 0 = none): per-channel gain +-12 %, offset +-12 levels and saturation +-20 %, times
    ``jitter``.
    """
    W, H = image.size
    S = min(H, W)
    if blur is None:
        blur = rng.uniform(0, 1.6) if rng.random() < 0.5 else 0.0
    if resample is None:
        resample = rng.uniform(1, 2) if rng.random() < 0.25 else 1.0
    if noise is None:
        noise = rng.uniform(0, 16)
    if jpeg is None:
        jpeg = int(rng.integers(30, 96)) if rng.random() < 1 / 3 else 0
    if jitter is None:
        jitter = rng.uniform(0, 1)
    im = image.convert("RGB")
    if resample > 1:
        small = (max(8, round(W / resample)), max(8, round(H / resample)))
        im = im.resize(small, Image.Resampling.BILINEAR).resize((W, H), Image.Resampling.BILINEAR)
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur * S / 64))
    arr = np.asarray(im, dtype=np.float64)
    if jitter > 0:
        gain = 1 + jitter * rng.uniform(-0.12, 0.12, 3)
        offset = jitter * rng.uniform(-12, 12, 3)
        arr = arr * gain + offset
        gray = arr.mean(-1, keepdims=True)
        arr = gray + (arr - gray) * (1 + jitter * rng.uniform(-0.2, 0.2))
    if noise > 0:
        arr = arr + rng.normal(0, noise, arr.shape)
    im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    if jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(jpeg))
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    return im



DEGRADATIONS: dict[str, dict | None] = {
    "clean": None,
    "degraded": {"blur": 1.0, "noise": 8.0, "jpeg": 0, "jitter": 0.0, "resample": 1.0},
    "random": {},
    "heavy": {"blur": 1.6, "noise": 16.0, "jpeg": 40, "jitter": 1.0, "resample": 1.0},
}
"""The settings of the reported accuracies (:func:`degrade_image` kwargs): ``degraded`` = Gaussian blur
1 px + noise std 8; ``random`` = the training augmentation's distribution; ``heavy`` = blur 1.6 px +
noise 16 + JPEG quality 40 + full-strength colour jitter (harsher than the training distribution's mean)."""
DEGRADED = DEGRADATIONS["degraded"]
