"""Negatives for the scene detector: things that are *not* one of the six shapes (issue 20 §1).

The shape classifier of :mod:`snapgen.eval.detector` has a reject class ("not a shape"); it learns it from
the images drawn here, and its false-object rate is measured on a held-out set drawn here too. Each image
is a pale scene background (:data:`~snapgen.data.scenes.BACKGROUND_COLORS`) with one to three negatives
and, half of the time, one real scene shape (so the classifier sees both in one image, and the real shape
must still be found), drawn at 4x and downsampled with Lanczos like the scenes.

Negative types
--------------
Training (:data:`TRAIN_TYPES`): ``ellipse`` (aspect 0.25-0.6, rotated), ``bar`` (aspect 0.08-0.4,
rotated), ``cross`` (two bars), ``glyph`` (a letter or digit in Pillow's default font), ``polygon``
(5-9 vertices, irregular), ``blob`` (a smooth random outline), ``noise_patch`` (a colour region with
strong per-pixel noise), ``texture_patch`` (stripes or checks of a colour), ``merged`` (two same-colour
copies of a scene shape with centres 35-60 % of their side apart; only the unsplit ones are labelled),
``cutoff`` (a scene shape 35-65 % outside the image) and ``smear`` (a heavily blurred streak).

Held out (:data:`HELDOUT_TYPES`, never in training): ``ring`` (annulus), ``crescent``, ``arrow``,
``corner`` (an L or T of bars) and ``scribble`` (a thick random polyline). The held-out set
(``stream="heldout"``) mixes them with the training types and uses its own seed stream; training uses
``stream="train"``, calibration ``stream="calib"``, so no image is shared.

Generated outlines that resemble an upright scene shape (IoU >= 0.8 with the shape fitted to their
box: :func:`shape_likeness`) are redrawn, so a random polygon that happens to be a triangle is never
labelled "not a shape".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..data.scenes import _SS, BACKGROUND_COLORS, COLORS, SHAPES, _draw_shape

__all__ = ["HELDOUT_TYPES", "NEGATIVE_TYPES", "STREAMS", "TRAIN_TYPES", "NegativeSample", "negative_image",
           "noise_image", "shape_likeness"]

TRAIN_TYPES = ("ellipse", "bar", "cross", "glyph", "polygon", "blob", "noise_patch", "texture_patch",
               "merged", "cutoff", "smear")
HELDOUT_TYPES = ("ring", "crescent", "arrow", "corner", "scribble")
NEGATIVE_TYPES = TRAIN_TYPES + HELDOUT_TYPES
STREAMS = {"train": 0, "calib": 1, "heldout": 2}
_GLYPHS = "ABCEFGHKLMNPRSTUVWXYZ123456789&?#%"   # no O / 0 / Q / D (near-circles)


@dataclass
class NegativeSample:
    """One negatives image: ``shapes`` = real scene objects in it (``shape``, ``color``, ``box`` in
    pixels), ``negatives`` = ``{"type", "box"}`` of each negative (box clipped to the image)."""

    image: Image.Image
    shapes: list[dict] = field(default_factory=list)
    negatives: list[dict] = field(default_factory=list)


def _rot(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, -s], [s, c]]).T


def _place(pts: np.ndarray, box) -> list[tuple[float, float]]:
    """Unit-scale points (longer extent 1, centred) into ``box`` (4x pixels)."""
    lo, hi = pts.min(0), pts.max(0)
    pts = (pts - (lo + hi) / 2) / max((hi - lo).max(), 1e-9)
    x0, y0, x1, y1 = box
    side = min(x1 - x0, y1 - y0)
    return [tuple(p) for p in (pts * side + ((x0 + x1) / 2, (y0 + y1) / 2)).tolist()]


def _bar(aspect: float, angle: float, offset=(0.0, 0.0)) -> np.ndarray:
    h = aspect / 2
    return _rot(np.array([[-0.5, -h], [0.5, -h], [0.5, h], [-0.5, h]]), angle) + offset


def shape_likeness(mask: np.ndarray) -> float:
    """Max IoU of a binary mask with any upright scene shape fitted to the mask's bounding square."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    best = 0.0
    for shape in SHAPES:
        im = Image.new("L", mask.shape[::-1], 0)
        _draw_shape(ImageDraw.Draw(im), shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), 255)
        ref = np.asarray(im) > 127
        best = max(best, (ref & mask).sum() / max((ref | mask).sum(), 1))
    return float(best)


def _outline(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons (unit scale) whose union is the negative (``kind`` in the outline types)."""
    ang = rng.uniform(0, np.pi)
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [_rot(np.stack([np.cos(t), rng.uniform(0.25, 0.6) * np.sin(t)], 1), ang)]
    if kind == "bar":
        return [_bar(rng.uniform(0.08, 0.4), ang)]
    if kind == "cross":
        off = rng.uniform(-0.2, 0.2, 2)
        return [_bar(rng.uniform(0.12, 0.3), ang), _bar(rng.uniform(0.12, 0.3), ang + np.pi / 2
                                                        + rng.uniform(-0.35, 0.35), off)]
    if kind == "polygon":
        k = int(rng.integers(5, 10))
        a = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(0.35, 1.0, k)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if kind == "blob":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = 1 + sum(rng.uniform(0.12, 0.32) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
        return [np.stack([r * np.cos(t), r * np.sin(t)], 1)]
    if kind == "arrow":
        w, hw, hl = rng.uniform(0.12, 0.25), rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
        pts = np.array([[-0.5, -w / 2], [0.5 - hl, -w / 2], [0.5 - hl, -hw], [0.5, 0], [0.5 - hl, hw],
                        [0.5 - hl, w / 2], [-0.5, w / 2]])
        return [_rot(pts, ang * 2)]
    if kind == "corner":
        w = rng.uniform(0.15, 0.3)
        horiz = _bar(w, 0.0, (0.0, -0.5 + w / 2))
        vert = _bar(w, np.pi / 2, ((rng.choice([-1, 0]) * (0.5 - w / 2)), 0.0))
        return [_rot(horiz, ang * 2), _rot(vert, ang * 2)]
    raise ValueError(f"unknown outline kind {kind!r}")


def _draw_negative(kind: str, box, rng: np.random.Generator, size) -> tuple[np.ndarray, np.ndarray | None]:
    """(alpha mask in 0..1 at 4x, per-pixel RGB offsets or None) of one negative inside ``box``."""
    m = Image.new("L", size, 0)
    draw = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    s = x1 - x0
    rgb_noise = None
    if kind in ("ellipse", "bar", "cross", "polygon", "blob", "arrow", "corner"):
        for _ in range(20):
            polys = _outline(kind, rng)
            m = Image.new("L", size, 0)
            draw = ImageDraw.Draw(m)
            allpts = np.concatenate(polys)
            for p in polys:
                draw.polygon(_place(np.concatenate([p, allpts]), box)[:len(p)], fill=255)
            if kind not in ("polygon", "blob") or shape_likeness(np.asarray(m) > 127) < 0.8:
                break
    elif kind == "glyph":
        font = ImageFont.load_default(size=max(8, int(s * rng.uniform(0.9, 1.25))))
        ch = str(rng.choice(list(_GLYPHS)))
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), ch, fill=255, font=font, anchor="mm",
                  stroke_width=int(s * rng.uniform(0.0, 0.06)), stroke_fill=255)
    elif kind in ("noise_patch", "texture_patch"):
        if rng.random() < 0.5:
            draw.rectangle(box, fill=255)
        else:
            draw.ellipse(box, fill=255)
        if kind == "noise_patch":
            std = rng.uniform(50, 110)
            small = rng.normal(0, std, (size[1] // _SS, size[0] // _SS, 3))
            rgb_noise = np.kron(small, np.ones((_SS, _SS, 1)))
        else:
            half = int(rng.integers(2, 6)) * _SS
            yy, xx = np.mgrid[0:size[1], 0:size[0]]
            pat = ((xx // half + yy // half) % 2 if rng.random() < 0.5
                   else ((xx * np.cos(rng.uniform(0, np.pi)) + yy * np.sin(rng.uniform(0, np.pi))) // half) % 2)
            arr = np.asarray(m, dtype=np.float64) * (pat > 0)
            return arr / 255.0, None
    elif kind == "smear":
        w = s * rng.uniform(0.12, 0.3)
        a = rng.uniform(0, np.pi)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        dx, dy = np.cos(a) * s / 2, np.sin(a) * s / 2
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=max(1, int(w)))
        m = m.filter(ImageFilter.GaussianBlur(float(s * rng.uniform(0.06, 0.14))))
        return np.asarray(m, dtype=np.float64) / 255.0 * rng.uniform(1.0, 1.6), None
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        r = rng.uniform(0.45, 0.7) * s / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    elif kind == "crescent":
        draw.ellipse(box, fill=255)
        a, off = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * s
        ox, oy = np.cos(a) * off, np.sin(a) * off
        draw.ellipse((x0 + ox, y0 + oy, x1 + ox, y1 + oy), fill=0)
    elif kind == "scribble":
        pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 6)))]
        draw.line(pts, fill=255, width=max(1, int(s * rng.uniform(0.08, 0.15))), joint="curve")
    else:
        raise ValueError(f"unknown negative type {kind!r}; expected one of {NEGATIVE_TYPES}")
    return np.asarray(m, dtype=np.float64) / 255.0, rgb_noise


def _free_box(rng, boxes, side: float, S4: float, tries: int = 50):
    for _ in range(tries):
        x0, y0 = rng.uniform(0.05 * S4, S4 * 0.95 - side, 2)
        b = (x0, y0, x0 + side, y0 + side)
        if all(b[2] + 0.04 * S4 < o[0] or o[2] + 0.04 * S4 < b[0] or b[3] + 0.04 * S4 < o[1]
               or o[3] + 0.04 * S4 < b[1] for o in boxes):
            return b
    return None


def negative_image(index: int, seed: int = 0, stream: str = "train", types: tuple[str, ...] | None = None,
                   resolution: int = 64, shape_p: float = 0.5) -> NegativeSample:
    """Negatives image ``index`` of a stream (:data:`STREAMS`); deterministic from ``(seed, stream,
    index)``. ``types`` default: :data:`TRAIN_TYPES` for train/calib, :data:`NEGATIVE_TYPES` for heldout."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {list(STREAMS)}")
    if types is None:
        types = NEGATIVE_TYPES if stream == "heldout" else TRAIN_TYPES
    rng = np.random.default_rng(np.random.SeedSequence([seed, 100 + STREAMS[stream], index]))
    S, S4 = resolution, resolution * _SS
    bg = np.asarray(list(BACKGROUND_COLORS.values())[int(rng.integers(len(BACKGROUND_COLORS)))], float)
    canvas = np.broadcast_to(bg, (S4, S4, 3)).copy()
    names = list(COLORS)
    boxes, negatives, shapes = [], [], []
    for _ in range(int(rng.integers(1, 4))):
        kind = str(rng.choice(types))
        side = rng.uniform(0.22, 0.45) * S4
        color = np.asarray(COLORS[names[int(rng.integers(len(names)))]], float)
        if kind == "cutoff":
            edge, out = int(rng.integers(4)), rng.uniform(0.35, 0.65) * side
            t = rng.uniform(0.1 * S4, 0.9 * S4 - side)
            x0, y0 = [(-out, t), (S4 - side + out, t), (t, -out), (t, S4 - side + out)][edge]
            box = (x0, y0, x0 + side, y0 + side)
            if any(not (box[2] < o[0] or o[2] < box[0] or box[3] < o[1] or o[3] < box[1]) for o in boxes):
                continue
            im = Image.new("L", (S4, S4), 0)
            _draw_shape(ImageDraw.Draw(im), str(rng.choice(SHAPES)), tuple(round(v) for v in box), 255)
            alpha, noise = np.asarray(im, float) / 255.0, None
        else:
            big = kind == "merged"
            box = _free_box(rng, boxes, side * (1.7 if big else 1.0), S4)
            if box is None:
                continue
            if big:
                b, sh = side, str(rng.choice(SHAPES))
                a, off = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6) * side
                c0 = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
                im = Image.new("L", (S4, S4), 0)
                for sgn in (-0.5, 0.5):
                    cx, cy = c0 + sgn * off * np.array([np.cos(a), np.sin(a)])
                    _draw_shape(ImageDraw.Draw(im), sh, tuple(round(v) for v in (cx - b / 2, cy - b / 2,
                                                                                 cx + b / 2, cy + b / 2)), 255)
                alpha, noise = np.asarray(im, float) / 255.0, None
            else:
                alpha, noise = _draw_negative(kind, box, rng, (S4, S4))
        a = np.clip(alpha, 0, 1)[..., None]
        fill = color if noise is None else color + noise
        canvas = canvas * (1 - a) + fill * a
        boxes.append(box)
        negatives.append({"type": kind, "box": tuple(float(np.clip(v / _SS, 0, S)) for v in box)})
    if rng.random() < shape_p:
        side = rng.uniform(0.2, 0.38) * S4
        box = _free_box(rng, boxes, side, S4)
        if box is not None:
            box = tuple(round(v) for v in box)
            sh, cname = str(rng.choice(SHAPES)), names[int(rng.integers(len(names)))]
            im = Image.new("L", (S4, S4), 0)
            _draw_shape(ImageDraw.Draw(im), sh, box, 255)
            a = (np.asarray(im, float) / 255.0)[..., None]
            canvas = canvas * (1 - a) + np.asarray(COLORS[cname], float) * a
            shapes.append({"shape": sh, "color": cname, "box": tuple(v / _SS for v in box)})
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    img = img.resize((S, S), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return NegativeSample(img, shapes, negatives)


def noise_image(index: int, std: float = 40.0, resolution: int = 64, seed: int = 0) -> Image.Image:
    """A scene background with per-pixel Gaussian noise of ``std`` levels and nothing else (issue 20's
    probe: a detector must find no object in it)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 200, index]))
    bg = np.asarray(list(BACKGROUND_COLORS.values())[index % len(BACKGROUND_COLORS)], float)
    arr = bg + rng.normal(0, std, (resolution, resolution, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
