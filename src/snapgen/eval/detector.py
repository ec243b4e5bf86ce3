"""SceneDetector: finds the shapes in a scene image and reads each one's shape, colour, box and centre.

It is the object detector of SceneEval (:mod:`snapgen.eval.sceneeval`), GenEval's protocol on the
procedural world of :mod:`snapgen.data.scenes`, so it must work on *generated* images: blurrier and
noisier than the renders, with colours a little off, objects that may touch or overlap, and stray
smudges.

Design: segment, then classify
------------------------------
The world is flat shapes on a pale background, so finding objects needs no learning; only telling a
blurred hexagon from a blurred circle does. The detector therefore

1. **Background.** The median colour of a thin ring of border pixels (3 % of the shorter side; scenes
   keep objects 4 % away from the border, and a median survives a generated object reaching the border).
2. **Foreground.** The RGB distance ``d`` of every (slightly smoothed) pixel from that colour, with
   hysteresis: connected components (``scipy.ndimage.label``) of ``d > t_low`` that contain a pixel with
   ``d > t_high`` and are not tiny (``min_area_frac`` of the image). Textured backgrounds are at most 14
   levels darker than their tone (``d`` < 25); object colours are >= 130 away from every background.
3. **Splitting merged objects** (scenes never touch; generated images may). By colour: a component
   whose interior (the rim is eroded away, since it mixes with the background) falls into two or more
   sizable colour groups -- each pixel labelled by the palette colour that best explains it as a mix of
   that colour and the background -- whose median colours are different named colours and clearly
   apart (CIELAB distance >= ``split_min_delta_e``), is cut between the groups. Then within each
   single-colour part: the half-maximum contour ``d >= d_obj / 2`` (``d_obj`` = the part's 90th
   percentile of ``d``) is taken, which undoes blur that merged two nearby objects; a region that falls
   apart at ``valley_level`` x ``d_obj`` into sizable pieces is cut along that intensity valley; and a
   region whose distance transform has maxima joined only through a neck thinner than ``neck_ratio`` x
   the smaller one (two touching circles) is cut between them (a power diagram of the maxima).
4. **Per object**: the box and centre of its half-maximum region (a blur-independent extent), the area
   in pixels, the colour = the nearest named colour in CIELAB of the median of its core pixels (the
   pixels farthest from the background), and the shape from a tiny CNN.
5. **Shape CNN** (:class:`ShapeNet`, ~60k parameters, ~0.25 MB): the object's soft mask
   ``clip(d / d_obj, 0, 1)`` (colour-free, so held-out colour-shape pairs cannot leak through it),
   cropped to a square around the object with a margin and resized to 24 x 24. Its softmax probability is
   the detection's ``confidence``. It is trained (:func:`train_detector`) on the components this very
   pipeline extracts from rendered ``split="train"`` scenes at random resolutions, after random
   degradation (:func:`degrade_image`: Gaussian blur, resampling blur, Gaussian noise, JPEG, colour
   jitter), so it has seen what generated images look like through the segmenter.

Why not a learned detector (a small CNN predicting boxes, like GenEval's Mask2Former)? It would need
far more training than a few CPU minutes to be as exact as segmentation is here, and every failure
would be opaque; segmentation's failure modes (merged objects, faint objects) are few, visible in the
failure grids, and handled explicitly. Why not geometric features (circularity, corner counts) for the
shape? At 64 px with blur a small hexagon and a circle differ by a pixel or two of outline, and
hand-set thresholds would need retuning for every size and blur level; a CNN learns them from degraded
crops in a minute.

Reproducing the shipped weights (``models/evaluators/scene-detector``)::

    OMP_NUM_THREADS=1 python -m snapgen.eval.detector --out models/evaluators/scene-detector

(deterministic from ``--seed``: training runs on one thread and reproduces the shipped file bit for
bit; about a minute of one core. It then prints :func:`accuracy_report`; ``--eval-only`` skips training.)

Measured accuracy of the shipped weights (300 renders per row at 64 px, ``val`` = in-distribution,
``heldout`` = scenes with held-out colour-shape pairs; ``count`` = images with the right number of
detections, ``shape`` / ``color`` over the objects matched to a detection; recall was 1.000 everywhere):

=========  ==============================  ==============================
setting    val: count / shape / color      heldout: count / shape / color
=========  ==============================  ==============================
clean      1.000 / 1.000 / 1.000           1.000 / 1.000 / 1.000
degraded   1.000 / 1.000 / 1.000           1.000 / 1.000 / 1.000
random     1.000 / 0.998 / 1.000           1.000 / 1.000 / 1.000
heavy      1.000 / 0.959 / 0.979           1.000 / 0.952 / 0.979
=========  ==============================  ==============================

(:data:`DEGRADATIONS`: degraded = Gaussian blur 1 px + noise std 8; random = the training augmentation's
distribution; heavy = blur 1.6 px + noise 16 + JPEG quality 40 + full colour jitter.)

Touching objects (:func:`evaluate_touching`, 120 pairs per cell; count = both objects found):
different shapes and colours, boxes 8 % apart / touching / overlapping 10 %: count 0.97 / 0.95 / 0.95
clean and 0.95 / 0.93 / 0.93 degraded, shapes and colours >= 0.995. Same shape and colour (the hard
case): 1.00 / 0.87 / 0.83 clean, 1.00 / 0.79 / 0.71 degraded. Known limit: two same-colour squares
touching along a side make one rectangle, which is never split (it reads as one square).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from ..data.scenes import COLORS, SHAPES, SceneDataset
from ..nn.io import ModelIOMixin
from ..utils.config import JSONConfigMixin
from .. import env

__all__ = [
    "DEGRADATIONS",
    "DetectedObject",
    "DetectorConfig",
    "SceneDetector",
    "ShapeNet",
    "accuracy_report",
    "default_detector_dir",
    "degrade_image",
    "evaluate_detector",
    "evaluate_touching",
    "load_detector",
    "train_detector",
]


def default_detector_dir() -> Path:
    """The shipped detector: ``$SNAPGEN_SCENE_DETECTOR`` or ``models/evaluators/scene-detector``."""
    return env.scene_detector_dir()


@dataclass(frozen=True)
class DetectedObject:
    """One detected object. ``box`` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive), ``center`` = the box
    centre (x, y), ``area`` = pixels inside the object's half-maximum contour, ``confidence`` = the shape
    classifier's probability for ``shape``."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    center: tuple[float, float]
    area: float
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectedObject:
        return cls(shape=d["shape"], color=d["color"], box=tuple(d["box"]), center=tuple(d["center"]),
                   area=float(d["area"]), confidence=float(d["confidence"]))


@dataclass(frozen=True)
class DetectorConfig(JSONConfigMixin):
    _config_kind = "SceneDetector"

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    palette: tuple[int, ...] = tuple(v for rgb in COLORS.values() for v in rgb)  # flat RGB, 3 per colour
    crop_size: int = 24
    crop_margin: float = 0.15          # margin around the object's box, fraction of its longer side
    channels: tuple[int, ...] = (16, 32, 64)
    hidden: int = 64
    border_frac: float = 0.03          # width of the border ring that gives the background colour
    smooth_sigma: float = 0.5          # pre-smoothing of the distance map, px at 64 px (scales with size)
    t_low: float = 35.0                # RGB distance from the background: weak foreground
    t_high: float = 70.0               # strong foreground (a component must contain some)
    min_area_frac: float = 0.004       # smallest object, fraction of the image area (16 px at 64 x 64)
    # splitting merged objects (see the module docstring)
    split_color_frac: float = 0.12     # a colour group must hold this share of a component's interior
    split_erode: float = 1.5 / 64      # the rim (this fraction of the shorter side) has no colour vote
    split_min_delta_e: float = 20.0    # colour groups closer than this (CIELAB) never split an object
    valley_level: float = 0.8          # same colour: cut where the region falls apart at this level...
    neck_ratio: float = 0.7            # ... or at a neck thinner than this fraction of the smaller lobe

    def __post_init__(self):
        self._tuplify()
        if len(self.palette) != 3 * len(self.colors):
            raise ValueError(f"palette must hold 3 values per colour: {len(self.colors)} colours, "
                             f"{len(self.palette)} values")
        if not 0 < self.t_low <= self.t_high:
            raise ValueError(f"need 0 < t_low <= t_high, got {self.t_low}, {self.t_high}")


# ----------------------------------------------------------------------------------------------------
# Colour helpers.


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in 0-255 -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], -1)


def _unmix_labels(pix: np.ndarray, bg: np.ndarray, palette: np.ndarray, prior: float = 0.3) -> np.ndarray:
    """Label each pixel (N, 3) with the palette colour that best explains it as ``bg + a (c - bg)``.

    ``a`` is clipped to [0.3, 1.1]; ``prior * (1 - a) * |c - bg|`` prefers explanations that need
    less mixing, so a gray object is gray, not half-transparent black, while a black object's blurred rim
    stays black."""
    dirs = palette - bg                                     # (K, 3)
    norm2 = (dirs ** 2).sum(1)                              # (K,)
    rel = pix - bg                                          # (N, 3)
    a = np.clip(rel @ dirs.T / norm2, 0.3, 1.1)             # (N, K)
    resid = np.linalg.norm(rel[:, None, :] - a[..., None] * dirs[None], axis=-1)
    cost = resid + prior * np.clip(1 - a, 0, None) * np.sqrt(norm2)
    return cost.argmin(1)


# ----------------------------------------------------------------------------------------------------
# The shape classifier.


class ShapeNet(torch.nn.Module):
    """Soft object mask (B, 1, S, S) -> shape logits (B, len(shapes))."""

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64), hidden: int = 64,
                 crop_size: int = 24):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c_in = c
        self.features = torch.nn.Sequential(*layers)
        side = crop_size // 2 ** len(channels)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c_in * side * side, hidden),
                                        torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))


@dataclass
class _Region:
    """An object candidate before shape classification (internal)."""

    soft: np.ndarray          # (H, W) soft mask of this object only, 0..1
    box: tuple[float, float, float, float]
    area: float
    color: str


class SceneDetector(ModelIOMixin, torch.nn.Module):
    """Segment-then-classify detector (see the module docstring). ``detect(image)`` -> objects."""

    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = config or DetectorConfig()
        c = self.config
        self.net = ShapeNet(len(c.shapes), c.channels, c.hidden, c.crop_size)
        self._palette = np.asarray(c.palette, dtype=np.float64).reshape(-1, 3)
        self._palette_lab = _srgb_to_lab(self._palette)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)

    # -- segmentation ------------------------------------------------------------------------------

    @staticmethod
    def _as_array(image) -> np.ndarray:
        if isinstance(image, Image.Image):
            return np.asarray(image.convert("RGB"), dtype=np.float64)
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image (PIL or an (H, W, 3) array), got shape {arr.shape}")
        return arr.astype(np.float64)

    def background(self, arr: np.ndarray) -> np.ndarray:
        """The background colour (3,) of an (H, W, 3) image: median of the border ring."""
        H, W, _ = arr.shape
        b = max(1, round(self.config.border_frac * min(H, W)))
        ring = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                               arr[b:-b, :b].reshape(-1, 3), arr[b:-b, -b:].reshape(-1, 3)])
        return np.median(ring, axis=0)

    def regions(self, image) -> list[_Region]:
        """Object candidates (soft masks, boxes, areas, colours) of one image; no shape yet."""
        c = self.config
        arr = self._as_array(image)
        H, W, _ = arr.shape
        S = min(H, W)
        bg = self.background(arr)
        sigma = c.smooth_sigma * S / 64
        smooth = ndimage.gaussian_filter(arr, (sigma, sigma, 0)) if sigma > 0 else arr
        d = np.linalg.norm(smooth - bg, axis=-1)
        min_area = max(4.0, c.min_area_frac * H * W)
        weak = d > c.t_low
        lab, n = ndimage.label(weak)
        if n == 0:
            return []
        strong_max = ndimage.maximum(d, lab, index=np.arange(1, n + 1))
        sizes = ndimage.sum(weak, lab, index=np.arange(1, n + 1))
        out: list[_Region] = []
        slices = ndimage.find_objects(lab)
        for k in range(n):
            if strong_max[k] <= c.t_high or sizes[k] < min_area:
                continue
            sl = _pad_slice(slices[k], 2, H, W)
            comp = lab[sl] == k + 1
            for part in self._split_by_color(comp, smooth[sl], d[sl], bg, min_area, S):
                for soft, half in self._split_by_shape(part, d[sl], min_area):
                    out.append(self._describe(soft, half, arr[sl], d[sl], sl, (H, W)))
        return out

    def _split_by_color(self, comp, pix_img, d, bg, min_area, S) -> list[np.ndarray]:
        """Parts of one component, one per significant colour group (usually just the component)."""
        c = self.config
        d90 = np.percentile(d[comp], 90)
        obj = comp & (d >= 0.5 * d90)
        if obj.sum() < 2 * min_area:
            return [comp]
        # Only the interior votes: rims mix with the background (and, in generated or JPEG'd images,
        # bleed into other hues), so they would otherwise split one object into a core and a ring.
        erode = max(1, round(c.split_erode * S))
        core = ndimage.binary_erosion(obj, iterations=erode)
        if core.sum() < min_area:
            return [comp]
        labels = np.full(comp.shape, -1)
        labels[core] = _unmix_labels(pix_img[core], bg, self._palette)
        counts = np.bincount(labels[core], minlength=len(self._palette))
        thresh = max(min_area / 2, c.split_color_frac * core.sum())
        groups = []  # (seed mask, Lab of its median colour, palette index)
        for k in np.flatnonzero(counts >= thresh):
            s = ndimage.binary_opening(labels == k, structure=np.ones((3, 3)))
            if s.sum() < min_area / 2:
                continue
            lab = _srgb_to_lab(np.median(pix_img[s], axis=0))
            groups.append((s, lab, int(np.linalg.norm(self._palette_lab - lab, axis=1).argmin())))
        # Two groups are two objects only if their own median colours read as different named colours
        # and differ clearly (a shaded or colour-shifted object has groups only a little apart).
        seeds: list[np.ndarray] = []
        kept: list[tuple[np.ndarray, int]] = []
        for s, lab, k in sorted(groups, key=lambda g: -g[0].sum()):
            distinct = all(k != k2 and np.linalg.norm(lab - lab2) >= max(
                c.split_min_delta_e, 0.6 * np.linalg.norm(self._palette_lab[k] - self._palette_lab[k2]))
                for lab2, k2 in kept)
            if distinct:
                kept.append((lab, k))
                seeds.append(s)
        if len(seeds) < 2:
            return [comp]
        marker = np.zeros(comp.shape, dtype=np.int32)
        for i, s in enumerate(seeds):
            marker[s] = i + 1
        _, (iy, ix) = ndimage.distance_transform_edt(marker == 0, return_indices=True)
        nearest = marker[iy, ix]
        return [comp & (nearest == i + 1) for i in range(len(seeds))]

    def _split_by_shape(self, part, d, min_area) -> list[tuple[np.ndarray, np.ndarray]]:
        """(soft mask, half-max mask) per object in one single-colour part."""
        c = self.config
        d_obj = np.percentile(d[part], 90)
        soft = np.where(part, np.clip(d / max(d_obj, 1e-6), 0, 1), 0.0)
        half = soft >= 0.5
        hl, hn = ndimage.label(half)
        pieces = []
        for j in range(1, hn + 1):
            h = hl == j
            if h.sum() < min_area:
                continue
            for v in self._split_valley(h, soft, min_area):
                pieces.extend(self._split_neck(v, c.neck_ratio, min_area))
        if not pieces:
            return []
        if len(pieces) == 1:
            return [(soft, pieces[0])]
        marker = np.zeros(part.shape, dtype=np.int32)
        for i, h in enumerate(pieces):
            marker[h] = i + 1
        _, (iy, ix) = ndimage.distance_transform_edt(marker == 0, return_indices=True)
        nearest = marker[iy, ix]
        return [(np.where(nearest == i + 1, soft, 0.0), h) for i, h in enumerate(pieces)]

    def _split_valley(self, h: np.ndarray, soft: np.ndarray, min_area: float) -> list[np.ndarray]:
        """Cut a half-max region along an intensity valley: two objects whose gap blur filled to above
        half height still fall apart at a higher level (``valley_level``) into sizable pieces."""
        hi = h & (soft >= self.config.valley_level)
        lab, n = ndimage.label(hi)
        if n < 2:
            return [h]
        sizes = ndimage.sum(hi, lab, np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= max(min_area / 2, 0.15 * h.sum())) + 1
        if len(keep) < 2:
            return [h]
        marker = np.where(np.isin(lab, keep), lab, 0)
        _, (iy, ix) = ndimage.distance_transform_edt(marker == 0, return_indices=True)
        nearest = marker[iy, ix]
        parts = [h & (nearest == k) for k in keep]
        if any(p.sum() < min_area for p in parts):
            return [h]
        return parts

    @staticmethod
    def _split_neck(h: np.ndarray, ratio: float, min_area: float) -> list[np.ndarray]:
        """Cut a binary region at narrow necks between distance-transform maxima."""
        dt = ndimage.distance_transform_edt(np.pad(h, 1))[1:-1, 1:-1]
        top = dt.max()
        if top < 2:
            return [h]
        peaks = (dt == ndimage.maximum_filter(dt, size=3)) & (dt >= max(1.5, 0.3 * top))
        plab, pn = ndimage.label(peaks, structure=np.ones((3, 3)))
        reps = ndimage.maximum_position(dt, plab, np.arange(1, pn + 1))  # one point per plateau
        reps.sort(key=lambda p: -dt[p])

        def path_min(p, q) -> float:  # the thinnest point of the straight path p -> q
            n = int(max(abs(p[0] - q[0]), abs(p[1] - q[1]))) + 1
            ys = np.rint(np.linspace(p[0], q[0], n + 1)).astype(int)
            xs = np.rint(np.linspace(p[1], q[1], n + 1)).astype(int)
            return float(dt[ys, xs].min())

        # Group the maxima, highest first (like a watershed merge tree). A maximum joins the group it
        # reaches through the thickest path, if that path never narrows below ``ratio`` x the smaller of
        # the two ends; one that reaches no group starts a new object. Two groups merge through it only
        # if the path between them stays that thick relative to both groups' tops (a low maximum in a
        # neck must not glue two objects together). Seeds = each group's top.
        groups: list[list[tuple[int, int]]] = []
        for p in reps:
            links = []  # (path minimum, group index)
            for gi, g in enumerate(groups):
                ok = [m for q in g if (m := path_min(p, q)) >= ratio * min(dt[p], dt[q])]
                if ok:
                    links.append((max(ok), gi))
            if not links:
                groups.append([p])
                continue
            links.sort(reverse=True)
            b0, g0 = links[0]
            groups[g0].append(p)
            for b, gi in links[1:]:
                if min(b0, b) >= ratio * min(dt[groups[g0][0]], dt[groups[gi][0]]):
                    groups[g0].extend(groups[gi])
                    groups[gi] = []
            groups = [g for g in groups if g]
        seeds = [max(g, key=lambda q: dt[q]) for g in groups]
        if len(seeds) < 2:
            return [h]
        # Power-diagram partition: a pixel goes to the lobe minimising |x - p|^2 - r^2 (r = the lobe's
        # inscribed radius), which cuts two touching disks exactly at their contact line.
        yy, xx = np.nonzero(h)
        cost = np.stack([(yy - y) ** 2 + (xx - x) ** 2 - dt[y, x] ** 2 for y, x in seeds])
        owner = cost.argmin(0)
        parts = []
        for i in range(len(seeds)):
            part = np.zeros_like(h)
            part[yy[owner == i], xx[owner == i]] = True
            parts.append(part)
        if any(p.sum() < min_area for p in parts):
            return [h]
        return parts

    def _describe(self, soft, half, pix, d, sl, hw) -> _Region:
        ys, xs = np.nonzero(half)
        oy, ox = sl[0].start, sl[1].start
        box = (float(xs.min() + ox), float(ys.min() + oy), float(xs.max() + 1 + ox), float(ys.max() + 1 + oy))
        # colour: median of the core (the half-max pixels farthest from the background)
        dv = d[half]
        core = half & (d >= np.percentile(dv, 60))
        full = np.zeros(hw)
        full[sl] = soft
        return _Region(soft=full, box=box, area=float(half.sum()),
                       color=self._nearest_color(np.median(pix[core], axis=0)))

    def _nearest_color(self, rgb: np.ndarray) -> str:
        """The named colour nearest to ``rgb`` (3,) in CIELAB."""
        k = int(np.linalg.norm(self._palette_lab - _srgb_to_lab(rgb), axis=1).argmin())
        return self.config.colors[k]

    # -- crops + classification --------------------------------------------------------------------

    def crop(self, soft: np.ndarray, box: Sequence[float], jitter: np.ndarray | None = None) -> torch.Tensor:
        """The classifier input (1, S, S) for one object: a square around ``box`` with a margin.

        ``jitter`` = (scale, dx, dy) perturbs the square (training augmentation)."""
        c = self.config
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0) * (1 + 2 * c.crop_margin)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if jitter is not None:
            side *= jitter[0]
            cx += jitter[1] * side
            cy += jitter[2] * side
        side = max(side, 4.0)
        n = max(int(np.ceil(side)), c.crop_size)
        # sample an n x n grid of pixel centres (bilinear), then area-downsample to crop_size
        t = (np.arange(n) + 0.5) / n * side - side / 2
        gy, gx = np.meshgrid(cy + t - 0.5, cx + t - 0.5, indexing="ij")
        patch = ndimage.map_coordinates(soft, [gy, gx], order=1, mode="constant", cval=0.0)
        x = torch.from_numpy(patch.astype(np.float32))[None, None]
        x = F.interpolate(x, size=(c.crop_size, c.crop_size), mode="area") if n != c.crop_size else x
        return x[0]

    @torch.no_grad()
    def detect(self, image) -> list[DetectedObject]:
        """Objects in one image (PIL or (H, W, 3) array), most confident first."""
        return self.detect_batch([image])[0]

    @torch.no_grad()
    def detect_batch(self, images: Sequence) -> list[list[DetectedObject]]:
        regions = [self.regions(im) for im in images]
        flat = [r for rs in regions for r in rs]
        if not flat:
            return [[] for _ in images]
        crops = torch.stack([self.crop(r.soft, r.box) for r in flat])
        was_training = self.training
        self.eval()
        probs = torch.softmax(self.net(crops), -1)
        self.train(was_training)
        conf, idx = probs.max(-1)
        out, i = [], 0
        for rs in regions:
            objs = []
            for r in rs:
                x0, y0, x1, y1 = r.box
                objs.append(DetectedObject(shape=self.config.shapes[int(idx[i])], color=r.color, box=r.box,
                                           center=((x0 + x1) / 2, (y0 + y1) / 2), area=r.area,
                                           confidence=float(conf[i])))
                i += 1
            objs.sort(key=lambda o: -o.confidence)
            out.append(objs)
        return out


def _pad_slice(sl, pad: int, H: int, W: int):
    return (slice(max(0, sl[0].start - pad), min(H, sl[0].stop + pad)),
            slice(max(0, sl[1].start - pad), min(W, sl[1].stop + pad)))


def load_detector(path: str | os.PathLike | None = None) -> SceneDetector:
    """The trained detector from ``path`` (default: :func:`default_detector_dir`), in eval mode."""
    path = Path(path) if path is not None else default_detector_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"scene detector not found at {path}; train one with "
                                f"`python -m snapgen.eval.detector --out {path}`")
    return SceneDetector.from_pretrained(path).eval()


# ----------------------------------------------------------------------------------------------------
# Degradation (training augmentation and robustness measurement).


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


# ----------------------------------------------------------------------------------------------------
# Training and evaluation.


def _match(objects: list[dict], boxes: list[tuple[float, ...]]) -> list[int]:
    """For each detected box, the index of the scene object whose box holds its centre (or -1);
    objects are matched at most once (closest centre first)."""
    pairs = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for j, o in enumerate(objects):
            bx0, by0, bx1, by1 = o["box"]
            if bx0 - 1 <= cx <= bx1 + 1 and by0 - 1 <= cy <= by1 + 1:
                dist = np.hypot(cx - (bx0 + bx1) / 2, cy - (by0 + by1) / 2)
                pairs.append((dist, i, j))
    out, used = [-1] * len(boxes), set()
    for _, i, j in sorted(pairs):
        if out[i] == -1 and j not in used:
            out[i] = j
            used.add(j)
    return out


def _training_crops(det: SceneDetector, n_scenes: int, seed: int):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    datasets = {}
    crops, labels = [], []
    shape_idx = {s: i for i, s in enumerate(det.config.shapes)}
    for i in range(n_scenes):
        res = int(rng.choice([40, 48, 64, 64, 64, 80, 96, 128]))
        if res not in datasets:
            datasets[res] = SceneDataset(res, seed=1000 + seed, split="train")
        sample = datasets[res].generate(i)
        image = degrade_image(sample.image, rng) if rng.random() < 0.8 else sample.image
        regions = det.regions(image)
        match = _match(sample.meta["objects"], [r.box for r in regions])
        for r, j in zip(regions, match):
            if j < 0:
                continue
            jit = np.array([rng.uniform(0.9, 1.12), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)])
            x = det.crop(r.soft, r.box, jitter=jit)
            if rng.random() < 0.5:
                x = x.flip(-1)
            crops.append(x)
            labels.append(shape_idx[sample.meta["objects"][j]["shape"]])
    return torch.stack(crops), torch.tensor(labels)


def train_detector(out_dir: str | os.PathLike | None = None, steps: int = 1500, seed: int = 0,
                   n_scenes: int = 3000, batch_size: int = 128, lr: float = 3e-3,
                   config: DetectorConfig | None = None, log_every: int = 250) -> SceneDetector:
    """Train the shape classifier on components extracted from degraded ``split="train"`` renders.

    Deterministic from ``seed``: runs on one thread (restored afterwards) with seeded generators.
    Saves to ``out_dir`` (``save_pretrained``) when given. About a minute of one CPU core at the defaults.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        det = SceneDetector(config)
        x, y = _training_crops(det, n_scenes, seed)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(det.net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        det.train()
        for step in range(steps):
            idx = torch.randint(len(x), (batch_size,), generator=g)
            xb = x[idx]
            # cheap on-the-fly augmentation: mask gain (faint or saturated objects) and pixel noise
            gain = 0.75 + 0.5 * torch.rand(batch_size, 1, 1, 1, generator=g)
            xb = (xb * gain + 0.05 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
            loss = F.cross_entropy(det.net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  ({len(x)} crops)", flush=True)
        det.eval()
        if out_dir is not None:
            det.save_pretrained(out_dir)
        return det
    finally:
        torch.set_num_threads(prev_threads)


@torch.no_grad()
def evaluate_detector(det: SceneDetector, n: int = 300, split: str = "val", resolution: int = 64,
                      degrade: dict | None = None, seed: int = 0) -> dict[str, float]:
    """Per-attribute accuracy on renders of ``split``: ``count`` (images whose number of detections is
    right), and over ground-truth objects matched to a detection: ``shape``, ``color``, ``both``;
    ``recall`` = matched objects / all objects. ``degrade``: kwargs of :func:`degrade_image` (None =
    clean renders, ``{}`` = random degradation as in training)."""
    ds = SceneDataset(resolution, seed=seed, split=split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    count_ok = n_obj = matched = shape_ok = color_ok = both_ok = 0
    for i in range(n):
        s = ds.generate(i)
        im = degrade_image(s.image, rng, **degrade) if degrade is not None else s.image
        dets = det.detect(im)
        objs = s.meta["objects"]
        count_ok += len(dets) == len(objs)
        n_obj += len(objs)
        for dd, j in zip(dets, _match(objs, [d.box for d in dets])):
            if j < 0:
                continue
            matched += 1
            sh, co = dd.shape == objs[j]["shape"], dd.color == objs[j]["color"]
            shape_ok += sh
            color_ok += co
            both_ok += sh and co
    m = max(matched, 1)
    return {"count": count_ok / n, "recall": matched / max(n_obj, 1), "shape": shape_ok / m,
            "color": color_ok / m, "both": both_ok / m}


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


@torch.no_grad()
def evaluate_touching(det: SceneDetector, n: int = 120, overlap: float = 0.0, same_color: bool = False,
                      degrade: dict | None = None, seed: int = 0) -> dict[str, float]:
    """Two objects side by side whose boxes overlap by ``overlap`` x the smaller side (0 = the boxes
    touch, negative = a gap), at 64 px: ``count`` = images with exactly two detections, and over those,
    ``shape`` / ``color`` accuracy (left object first). ``same_color``: both objects the same shape and
    colour (a counting scene's worst case); otherwise different shapes and colours."""
    from ..data.scenes import _SS, BACKGROUND_COLORS, _draw_shape  # the scenes' own renderer

    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    bgs, names = list(BACKGROUND_COLORS.values()), list(COLORS)
    count = shape = color = 0
    for t in range(n):
        s1, s2 = (str(v) for v in rng.choice(SHAPES, 2, replace=False))
        c1, c2 = (str(v) for v in rng.choice(names, 2, replace=False))
        if same_color:
            s2, c2 = s1, c1
        a, b = rng.uniform(14, 22, 2)
        x0, y0 = rng.uniform(4, 10), rng.uniform(10, 50 - max(a, b))
        x1, y1 = x0 + a - overlap * min(a, b), y0 + rng.uniform(-3, 3)
        canvas = Image.new("RGB", (64 * _SS, 64 * _SS), bgs[t % len(bgs)])
        draw = ImageDraw.Draw(canvas)
        for sh, col, box in ((s1, c1, (x0, y0, x0 + a, y0 + a)), (s2, c2, (x1, y1, x1 + b, y1 + b))):
            _draw_shape(draw, sh, tuple(round(v * _SS) for v in box), COLORS[col])
        im = canvas.resize((64, 64), Image.Resampling.LANCZOS, reducing_gap=2.0)
        if degrade is not None:
            im = degrade_image(im, rng, **degrade)
        dets = sorted(det.detect(im), key=lambda o: o.center[0])
        if len(dets) == 2:
            count += 1
            shape += (dets[0].shape == s1) + (dets[1].shape == s2)
            color += (dets[0].color == c1) + (dets[1].color == c2)
    m = max(2 * count, 1)
    return {"count": count / n, "shape": shape / m, "color": color / m}


def accuracy_report(det: SceneDetector, n: int = 300, touching: int = 120) -> dict[str, dict[str, float]]:
    """Everything the module docstring reports: :func:`evaluate_detector` on ``val`` and ``heldout``
    under each of :data:`DEGRADATIONS`, and :func:`evaluate_touching` (``touching`` images per cell)."""
    report = {}
    for split in ("val", "heldout"):
        for name, deg in DEGRADATIONS.items():
            report[f"{split}/{name}"] = evaluate_detector(det, n, split, degrade=deg)
    for same in (False, True):
        for overlap in (-0.08, 0.0, 0.1):
            for name in ("clean", "degraded"):
                key = f"touching/{'same' if same else 'different'}-color/overlap{overlap:+.2f}/{name}"
                report[key] = evaluate_touching(det, touching, overlap, same, DEGRADATIONS[name])
    return report


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train SceneEval's shape classifier and report accuracy.")
    p.add_argument("--out", default=str(default_detector_dir()), help="output folder (save_pretrained)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--scenes", type=int, default=3000, help="training scenes (crops come from these)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=300, help="held-out renders per evaluation")
    p.add_argument("--eval-only", action="store_true", help="evaluate the detector in --out, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.eval_only:
        det = load_detector(args.out)
    else:
        det = train_detector(args.out, steps=args.steps, seed=args.seed, n_scenes=args.scenes)
    report = accuracy_report(det, args.eval_images)
    for k, v in report.items():
        print(f"{k:48s} " + "  ".join(f"{m} {x:.4f}" for m, x in v.items()))


if __name__ == "__main__":
    main()
