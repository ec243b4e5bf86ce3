"""The segmentation half of :class:`~snapgen.eval.detector.SceneDetector`: background, foreground,
splitting merged objects, and each object's box, area and colour (no learning involved).

Steps (the design is explained in :mod:`snapgen.eval.detector`; issue 20 §1 added the noise guard):

1. **Background.** The median colour of a thin ring of border pixels.
2. **Noise guard.** The background's pixel noise is measured on the same ring, from differences of
   horizontally adjacent pixels (a robust MAD estimate, blind to stripes and checks, which change
   slowly); the foreground thresholds are raised to ``noise_k_low`` / ``noise_k_high`` times the noise
   that survives the pre-smoothing, so a noisy background (issue 20: a pale background with Gaussian
   noise of std 40 gave 18 "objects") yields no components. Clean and mildly noisy images keep the
   fixed thresholds (``t_low`` / ``t_high``). Measured (a script; 30 noise images per std, an untrained
   classifier, so the guard alone): candidates on pure noise of std 20 / 30 / 40 / 50 / 60 / 80 / 100 =
   0 everywhere with ``noise_k_low, noise_k_high = 3, 4.5`` (the defaults); with 2 / 3 there were 5 at
   std 40, 11 at 60, 20 at 80 (20 images each). 50 renders degraded with noise std 30 + blur 1 px kept
   their object count (48 of 50 with 3.5 / 5); 100 "heavy" ones too. ``tests/test_detector.py`` checks it.
3. **Foreground** by hysteresis: connected components of ``d > t_low`` holding a pixel ``d > t_high``
   and at least ``min_area_frac`` of the image.
6. **Flat objects only** (issue 20): scene objects are flat-coloured, so an object whose *texture* (the
   median RGB deviation from its median colour, inside its half-maximum region less a 1-px rim) exceeds
   ``max(max_texture, texture_k x the image's noise distance)`` is a noise or texture patch, not an
   object; and an object whose half-maximum area is under ``min_object_frac`` of the image (a smallest
   scene object, a small star at 40 px, covers ~0.012) is a speck (e.g. a cell of a checked patch).
4. **Splitting merged objects** by colour, by intensity valleys and at necks.
5. **Per object**: box and centre of the half-maximum region, area, named colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["TEXMAP_SCALE", "Region", "Segmenter", "srgb_to_lab"]

TEXMAP_SCALE = 40.0
"""RGB levels of off-line colour deviation that saturate a region's ``texmap`` (:meth:`Segmenter._texmap`)."""
TEXMAP_FLOOR = 15.0
"""RGB levels of off-line deviation a flat object may show (JPEG chroma, colour jitter) that read 0."""
TEXMAP_SIGMA = 1.0
"""Gaussian smoothing (px at 64 px) of the image the texture map is measured on: it cuts white pixel
noise (a degraded flat object) to ~0.3x but keeps most of a blurred noise patch's blotches."""

def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
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



@dataclass
class Region:
    """An object candidate before shape classification (internal)."""

    soft: np.ndarray          # (H, W) soft mask of this object only, 0..1
    box: tuple[float, float, float, float]
    area: float
    color: str
    texture: float = 0.0      # median RGB deviation from the object's median colour
    texmap: np.ndarray | None = None  # (H, W) per-pixel colour non-uniformity, 0..1 (classifier input)



class Segmenter:
    """Mixin of :class:`~snapgen.eval.detector.SceneDetector`: everything before the shape classifier.
    Needs ``self.config`` (a ``DetectorConfig``), ``self._palette`` and ``self._palette_lab``."""

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

    def noise_level(self, arr: np.ndarray) -> float:
        """The background's per-channel pixel noise std (0-255 levels) of an (H, W, 3) image, from the
        border ring: MAD of horizontally adjacent differences / sqrt(2). Stripes and checks (smooth at the
        pixel scale) and an object reaching the border (a minority of the ring) barely move it."""
        H, W, _ = arr.shape
        b = max(2, round(self.config.border_frac * min(H, W)))
        strips = [arr[:b], arr[-b:], arr[b:-b, :b].transpose(1, 0, 2), arr[b:-b, -b:].transpose(1, 0, 2)]
        diffs = np.concatenate([np.abs(np.diff(s, axis=1)).reshape(-1) for s in strips])
        return float(1.4826 * np.median(diffs) / np.sqrt(2))

    def thresholds(self, arr: np.ndarray, sigma: float) -> tuple[float, float]:
        """(t_low, t_high) for one image: the fixed ones, raised on noisy backgrounds (module docstring).
        The noise std after the pre-smoothing is ``noise x sqrt(sum of the 2-D kernel's squared weights)``;
        the RGB distance of pure noise is about that times sqrt(3)."""
        c = self.config
        noise = self.noise_level(arr)
        if sigma > 0:
            delta = np.zeros((33, 33))
            delta[16, 16] = 1.0
            noise *= float(np.sqrt((ndimage.gaussian_filter(delta, sigma) ** 2).sum()))
        nd = noise * np.sqrt(3)
        return max(c.t_low, c.noise_k_low * nd), max(c.t_high, c.noise_k_high * nd)

    def regions(self, image) -> list[Region]:
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
        t_low, t_high = self.thresholds(arr, sigma)
        ts = TEXMAP_SIGMA * S / 64   # the texture map's smoothing: white pixel noise fades, blotches stay
        tsmooth = ndimage.gaussian_filter(arr, (ts, ts, 0))
        weak = d > t_low
        lab, n = ndimage.label(weak)
        if n == 0:
            return []
        strong_max = ndimage.maximum(d, lab, index=np.arange(1, n + 1))
        sizes = ndimage.sum(weak, lab, index=np.arange(1, n + 1))
        out: list[Region] = []
        slices = ndimage.find_objects(lab)
        for k in range(n):
            if strong_max[k] <= t_high or sizes[k] < min_area:
                continue
            sl = _pad_slice(slices[k], 2, H, W)
            comp = lab[sl] == k + 1
            for part in self._split_by_color(comp, smooth[sl], d[sl], bg, min_area, S):
                for soft, half in self._split_by_shape(part, d[sl], min_area):
                    out.append(self._describe(soft, half, arr[sl], d[sl], sl, (H, W), bg, tsmooth[sl]))
        # flat-colour objects only: no patch of noise or texture, no speck smaller than an object
        max_texture = max(c.max_texture, c.texture_k * self.noise_level(arr) * np.sqrt(3))
        min_object = c.min_object_frac * H * W
        return [r for r in out if r.texture <= max_texture and r.area >= min_object]

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
            lab = srgb_to_lab(np.median(pix_img[s], axis=0))
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

    def _describe(self, soft, half, pix, d, sl, hw, bg=None, tpix=None) -> Region:
        ys, xs = np.nonzero(half)
        oy, ox = sl[0].start, sl[1].start
        box = (float(xs.min() + ox), float(ys.min() + oy), float(xs.max() + 1 + ox), float(ys.max() + 1 + oy))
        # colour: median of the core (the half-max pixels farthest from the background)
        dv = d[half]
        core = half & (d >= np.percentile(dv, 60))
        full = np.zeros(hw)
        full[sl] = soft
        # texture: median RGB deviation from the median colour of the half-max region less its rim
        # (the rim mixes with the background), or of the core for tiny objects
        inner = ndimage.binary_erosion(half)
        inner = inner if inner.sum() >= 8 else core
        med = np.median(pix[inner], axis=0)
        texture = float(np.median(np.linalg.norm(pix[inner] - med, axis=-1)))
        med = np.median(pix[core], axis=0)
        return Region(soft=full, box=box, area=float(half.sum()),
                      color=self._nearest_color(med), texture=texture,
                      texmap=None if bg is None else self._texmap(pix if tpix is None else tpix, med, bg,
                                                                   soft, sl, hw))

    @staticmethod
    def _texmap(pix, med, bg, soft, sl, hw) -> np.ndarray:
        """Per-pixel colour non-uniformity of one object (the ``texture`` input of the classifier,
        :data:`~snapgen.eval.detector.INPUTS`), on the image smoothed by :data:`TEXMAP_SIGMA`: the RGB
        distance of each pixel from the segment background -> object colour (so a flat object's blurred
        rim, a mix of the two, reads 0), less :data:`TEXMAP_FLOOR`, over :data:`TEXMAP_SCALE` levels,
        clipped to 0..1, inside the object's soft mask only. A noise or texture patch is bright in it; a
        flat shape is dark but for the image's own noise."""
        v = med - bg
        rel = pix - bg
        a = np.clip((rel @ v) / max(float(v @ v), 1e-6), 0.0, 1.0)
        resid = np.linalg.norm(rel - a[..., None] * v, axis=-1)
        full = np.zeros(hw)
        full[sl] = np.where(soft > 0, np.clip((resid - TEXMAP_FLOOR) / TEXMAP_SCALE, 0, 1), 0.0)
        return full

    def _nearest_color(self, rgb: np.ndarray) -> str:
        """The named colour nearest to ``rgb`` (3,) in CIELAB."""
        k = int(np.linalg.norm(self._palette_lab - srgb_to_lab(rgb), axis=1).argmin())
        return self.config.colors[k]

    # -- crops + classification --------------------------------------------------------------------



def _pad_slice(sl, pad: int, H: int, W: int):
    return (slice(max(0, sl[0].start - pad), min(H, sl[0].stop + pad)),
            slice(max(0, sl[1].start - pad), min(W, sl[1].stop + pad)))

