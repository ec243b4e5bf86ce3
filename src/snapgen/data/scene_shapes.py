"""The scene world's shape outlines (:mod:`snapgen.data.scenes`): polygons normalised to a unit box centred at 0
(longer axis spans [-0.5, 0.5]) and :func:`draw_shape`, which fills a box with one shape in Pillow."""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

__all__ = ["draw_shape"]


def _normalise(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / (hi - lo).max()


def _unit_polygons() -> dict[str, np.ndarray]:
    polys = {}
    polys["triangle"] = _normalise(np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]))
    k = np.arange(10)
    ang = -np.pi / 2 + k * np.pi / 5
    rad = np.where(k % 2 == 0, 1.0, 0.45)
    polys["star"] = _normalise(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1))
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    hx = 16 * np.sin(t) ** 3
    hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    polys["heart"] = _normalise(np.stack([hx, hy], 1))
    a = np.arange(6) * np.pi / 3
    polys["hexagon"] = _normalise(np.stack([np.cos(a), np.sin(a)], 1))
    return polys


_UNIT_POLYGONS = _unit_polygons()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], rgb: tuple[int, int, int]):
    """Draw ``shape`` filling ``box`` (supersampled pixel coordinates, inclusive-exclusive)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    else:
        side = x1 - x0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        pts = _UNIT_POLYGONS[shape] * (side - 1) + (cx - 0.5, cy - 0.5)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=rgb)
