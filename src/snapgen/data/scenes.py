"""Procedural compositional scenes: a small world for training and for GenEval-style alignment checks.

The world
---------
Every image is a pale background with one to four flat-coloured shapes on it, and a caption that
describes them. Because the scene is generated from a description, the description (``Sample.meta``)
is exact, and an evaluator can later check whether a *generated* image shows what a caption asked for:
the right shapes, colours, counts and spatial relations.

* Shapes (:data:`SHAPES`): circle, square, triangle, star, heart, hexagon.
* Colours (:data:`COLORS`, name -> RGB): red, orange, yellow, green, blue, purple, pink, brown, black,
  gray. They are far apart in RGB (Euclidean distance >= 90 between any two). White is left out
  on purpose: backgrounds are pale, and a white object would not stand out from them.
* Sizes (:data:`SIZES`, name -> side of the object's square box as a fraction of the image's shorter
  side, jittered by +-8 %): small 0.20, medium 0.28, large 0.38. Sizes are named in some captions only;
  when a size word is in a caption it is the object's true size. A size can be lowered (and its label
  with it) when the objects would not fit the canvas otherwise (tiny or very elongated images).
* Backgrounds (:data:`BACKGROUNDS`): ``"plain"`` (one pale tone) or ``"textured"`` (faint stripes,
  checks or noise in a pale tone, at most 14 levels darker). Background tones are never an object
  colour and differ from every object colour by >= 100 in some channel (Euclidean >= 130). Their names
  never appear in captions (a caption may say "on a plain/striped/checkered/speckled background").
* Relations (:data:`RELATIONS`): ``"left of"``, ``"right of"``, ``"above"``, ``"below"``. A relation is
  geometrically true: for "A left of B", A's box ends (plus a margin) before B's box starts on the x
  axis, and the centres' vertical offset is at most half their horizontal offset, so the relation is
  unambiguous (the same holds, transposed, for above/below). Relation words in captions always contain
  the relation's name ("to the left of", "left of", "on the left of", "above", "below", ...).

Objects never overlap: boxes keep a gap of ``max(1 px, 5 % of the shorter side)`` (or touch, in a row, with
``touching``) between each other and
stay inside the image with a border. Shapes are drawn with Pillow at 4x and downsampled with Lanczos
(anti-aliased edges; about 0.4 ms for a 64x64 sample on one CPU core); everything scales with the
resolution (any ``(H, W)`` with both sides >= 16).
Every shape is filled at the centre of its box, so the pixel there has the object's colour.

Captions: ``captions="templates"`` (default) or ``"diverse"`` (many phrasings, both object orders, relations from
either side, synonyms, digits): :mod:`snapgen.data.scene_captions`. The examples below are templates captions.
Layout: :mod:`snapgen.data.scene_layout`.

Categories (:data:`CATEGORIES`, GenEval's six; uniform unless ``category_weights`` or restricted)
---------------------------------------------------------------------------
* ``single_object``: one object. "a red star", "a photo of a red star", "one red star on a plain background".
* ``two_object``: two objects of different shapes (colours drawn independently, may coincide).
  "a red star and a blue circle".
* ``counting``: one to four identical-looking objects (same shape and colour, sizes may vary); the
  count is a number word. "three green hearts", "exactly two blue squares". Counts 2-4 are three times
  as likely as 1 (weights 1:3:3:3).
* ``colors``: one object, the caption stresses its colour. "a purple hexagon", "a hexagon that is purple".
* ``position``: two objects of different shapes and a relation, subject first (``relation.subject`` is
  object 0, ``relation.object`` object 1). "a red circle to the left of a blue square".
* ``color_attr``: two objects with different shapes *and* different colours (attribute binding).
  "a red square and a green triangle", "a square that is red and a triangle that is green".

Held-out (colour, shape) pairs
------------------------------
:data:`HELDOUT_PAIRS` = (blue, star), (red, hexagon), (yellow, heart), (green, triangle),
(purple, circle), (orange, square): each shape and each of those colours once, so every held-out
colour and shape is seen in training, only never *together*. ``split="train"`` (and ``"val"``, an
in-distribution evaluation split with its own random stream) never draws an object with a held-out
pair; ``split="heldout"`` draws scenes of every category in which at least one object is a held-out
pair (in ``counting`` all objects are). This measures compositional generalisation.

Determinism
-----------
Item ``i`` depends only on ``(seed, split, i)`` (``np.random.SeedSequence([seed, split_id, i])``), not
on the order of calls or on ``length``, ``categories`` aside (the category set changes what is drawn).

``Sample.meta``::

    {"category": str,
     "objects": [{"shape": str, "color": str, "size": str, "box": (x0, y0, x1, y1)}, ...],
     "relation": None | {"subject": 0, "relation": "left of", "object": 1},
     "background": {"kind": "plain" | "textured", "color": name, "rgb": (r, g, b),
                    "pattern": None | "stripes" | "checks" | "noise"}}

Boxes are in pixels of the final image (floats on a quarter-pixel grid, ``x1 = x0 + side``); a shape
fills its box along its longer axis and is centred in it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..utils.resolution import parse_resolution
from .base import Sample
from .scene_layout import SS as _SS, quantise as _quantise, try_layout as _try_layout, \
    try_touching_layout as _try_touching_layout
from .scene_captions import CAPTION_STYLES, NUMBER_WORDS, PLURALS, SHAPES, describe, diverse_caption, \
    template_caption
from .scene_shapes import draw_shape

_draw_shape = draw_shape  # its former name here (tests/test_detector.py and older code import it)

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_COLORS",
    "CAPTION_STYLES",
    "CATEGORIES",
    "COLORS",
    "HELDOUT_PAIRS",
    "NUMBER_WORDS",
    "PLURALS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SceneDataset",
    "describe",
]


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (255, 220, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (130, 40, 190),
    "pink": (255, 105, 180),
    "brown": (135, 70, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

SIZES: dict[str, float] = {"small": 0.20, "medium": 0.28, "large": 0.38}
_SIZE_NAMES = tuple(SIZES)
_SIZE_JITTER = 0.08

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BACKGROUNDS: tuple[str, ...] = ("plain", "textured")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
_SPLIT_IDS = {"train": 0, "val": 1, "heldout": 2}

# Pale tones; none is an object colour and none is close to one (see the module docstring).
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "ivory": (250, 247, 235),
    "cream": (245, 236, 212),
    "sky": (228, 238, 248),
    "mint": (230, 245, 234),
    "blush": (250, 233, 233),
    "silver": (234, 234, 234),
}
_BG_NAMES = tuple(BACKGROUND_COLORS)
_PATTERNS = ("stripes", "checks", "noise")
_TEXTURE_DEPTH = 14  # how much darker the texture's dark parts are (0-255 scale)

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("blue", "star"),
    ("red", "hexagon"),
    ("yellow", "heart"),
    ("green", "triangle"),
    ("purple", "circle"),
    ("orange", "square"),
)
_HELDOUT = frozenset(HELDOUT_PAIRS)
_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in _HELDOUT)

_COUNT_VALUES = np.array([1, 2, 3, 4])
_COUNT_WEIGHTS = np.array([1.0, 3.0, 3.0, 3.0]) / 10.0
_MIN_RESOLUTION = 16



def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class SceneDataset(torch.utils.data.Dataset):
    """Procedural compositional scenes (see the module docstring): items are :class:`Sample` objects.

    Args:
        resolution: output size, an int (square) or ``(H, W)``; both sides >= 16.
        length: ``len(dataset)``; indices ``0 .. length-1`` are valid (``stream`` is unbounded).
        seed: base seed (non-negative int).
        split: ``"train"`` / ``"val"`` (no held-out colour-shape pair ever) or ``"heldout"`` (at least
            one held-out pair per scene).
        categories: the categories to draw from (uniformly); ``None`` = all of :data:`CATEGORIES`.
        backgrounds: background kinds to draw from (uniformly), a subset of :data:`BACKGROUNDS`.
        captions: caption style, ``"templates"`` (round one's, the default: draws reproduce the shipped recipe's
            data) or ``"diverse"`` (many phrasings per scene; :mod:`snapgen.data.scene_captions`).
        category_weights: ``{category: weight}`` over ``categories`` (missing ones weigh 1; e.g. more
            ``position`` scenes); ``None`` = uniform (the default draws; a given dict draws differently even if
            it is uniform).
        touching: probability that a ``counting`` scene of 2-4 objects lays them side by side in a row or a
            column, each box touching the next (:func:`~snapgen.data.scene_layout.try_touching_layout`; never
            squares, whose count would not be in the image): the hard case for counting. 0 (default) draws
            nothing extra.
    """

    def __init__(
        self,
        resolution: int | tuple[int, int] = 64,
        length: int = 100_000,
        seed: int = 0,
        split: str = "train",
        categories: Sequence[str] | None = None,
        backgrounds: Sequence[str] = BACKGROUNDS,
        captions: str = "templates",
        category_weights: dict[str, float] | None = None,
        touching: float = 0.0,
    ):
        self.height, self.width = parse_resolution(
            resolution, minimum=_MIN_RESOLUTION,
            too_small=f"resolution must be at least {_MIN_RESOLUTION} px per side, got {{!r}}")
        if not _is_int(length) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if categories is None:
            cats = CATEGORIES
        else:
            if isinstance(categories, str):
                categories = (categories,)
            cats = tuple(dict.fromkeys(categories))
            bad = [c for c in cats if c not in CATEGORIES]
            if bad or not cats:
                raise ValueError(f"unknown or empty categories {bad or list(cats)}; expected a non-empty "
                                 f"subset of {CATEGORIES}")
        if isinstance(backgrounds, str):
            backgrounds = (backgrounds,)
        bgs = tuple(dict.fromkeys(backgrounds))
        bad = [b for b in bgs if b not in BACKGROUNDS]
        if bad or not bgs:
            raise ValueError(f"unknown or empty backgrounds {bad or list(bgs)}; expected a non-empty "
                             f"subset of {BACKGROUNDS}")
        if captions not in CAPTION_STYLES:
            raise ValueError(f"unknown captions style {captions!r}; expected one of {CAPTION_STYLES}")
        self._cat_p = None
        if category_weights is not None:
            bad = sorted(set(category_weights) - set(cats))
            w = np.array([float(category_weights.get(c, 1.0)) for c in cats])
            if bad or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"category_weights must map categories of {cats} to weights >= 0 (not all 0), "
                                 f"got {dict(category_weights)!r}")
            self._cat_p = w / w.sum()
        if not 0.0 <= float(touching) <= 1.0:
            raise ValueError(f"touching must be a probability in [0, 1], got {touching!r}")
        self.captions, self.category_weights, self.touching = captions, category_weights, float(touching)
        self.length, self.seed, self.split = int(length), int(seed), split
        self.categories, self.backgrounds = cats, bgs
        self._split_id = _SPLIT_IDS[split]
        S = min(self.height, self.width)
        self._border = 0.04 * S
        self._gap = max(1.0, 0.05 * S)

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"SceneDataset indices must be integers, got {type(index).__name__}") from None
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for SceneDataset of length {self.length}")
        return self.generate(i)

    def stream(self, start: int = 0) -> Iterator[Sample]:
        """Items ``start, start+1, ...`` forever (not bounded by ``length``)."""
        i = operator.index(start)
        if i < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        while True:
            yield self.generate(i)
            i += 1

    def __repr__(self) -> str:
        return (f"SceneDataset(resolution={self.resolution}, length={self.length}, seed={self.seed}, "
                f"split={self.split!r}, categories={self.categories}, backgrounds={self.backgrounds}, "
                f"captions={self.captions!r}, category_weights={self.category_weights})")

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, i: int) -> Sample:
        """Item ``i`` (any non-negative int), deterministic from ``(seed, split, i)``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._split_id, int(i)]))
        meta = self._sample_scene(rng)
        image = self._render(meta, rng)
        caption = (template_caption if self.captions == "templates" else diverse_caption)(meta, rng)
        return Sample(image=image, caption=caption, meta=meta)

    def _pairs(self, rng, n: int, distinct_shape: bool, distinct_color: bool, same: bool):
        """(colour, shape) for ``n`` objects under the split's rule and the category's constraints."""
        if same:  # counting: one pair for all objects
            pool = HELDOUT_PAIRS if self.split == "heldout" else _TRAIN_PAIRS
            return [pool[int(rng.integers(len(pool)))]] * n
        forced = int(rng.integers(n)) if self.split == "heldout" else -1
        pool = _ALL_PAIRS if self.split == "heldout" else _TRAIN_PAIRS
        for _ in range(1000):
            pairs = [HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))] if k == forced
                     else pool[int(rng.integers(len(pool)))] for k in range(n)]
            if distinct_shape and len({s for _, s in pairs}) < n:
                continue
            if distinct_color and len({c for c, _ in pairs}) < n:
                continue
            return pairs
        raise RuntimeError("could not draw object pairs")  # pragma: no cover (probability ~0)

    def _sample_scene(self, rng: np.random.Generator) -> dict[str, Any]:
        if self._cat_p is None:
            cat = self.categories[int(rng.integers(len(self.categories)))]
        else:
            cat = self.categories[int(rng.choice(len(self.categories), p=self._cat_p))]
        relation = None
        if cat in ("single_object", "colors"):
            pairs = self._pairs(rng, 1, False, False, False)
        elif cat == "counting":
            pairs = self._pairs(rng, int(rng.choice(_COUNT_VALUES, p=_COUNT_WEIGHTS)), False, False, True)
        else:
            pairs = self._pairs(rng, 2, True, cat == "color_attr", False)
            if cat == "position":
                relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        n = len(pairs)
        # squares never touch: same-colour squares side by side are one polygon, their count is not in the image
        touch = (bool(self.touching) and cat == "counting" and n > 1 and pairs[0][1] != "square"
                 and bool(rng.random() < self.touching))
        size_idx = rng.integers(len(_SIZE_NAMES), size=n)
        jitter = 1 + _SIZE_JITTER * (2 * rng.random(n) - 1)
        S, W, H = min(self.height, self.width), self.width, self.height
        while True:
            fracs = np.array([SIZES[_SIZE_NAMES[k]] for k in size_idx]) * jitter
            sides = np.maximum(_quantise(fracs * S), 2.0)
            pos = _try_touching_layout(rng, sides, W, H, self._border) if touch else None
            if pos is None:
                pos = _try_layout(rng, sides, W, H, self._border, self._gap, relation)
            if pos is not None:
                break
            if not size_idx.any():  # pragma: no cover (all-small layouts always fit at >= 16 px)
                raise RuntimeError(f"could not lay out {n} objects at resolution {self.resolution}")
            size_idx[int(np.argmax(size_idx))] -= 1  # shrink the largest object and try again
        objects = [
            {"shape": s, "color": c, "size": _SIZE_NAMES[int(size_idx[k])],
             "box": (float(pos[k, 0]), float(pos[k, 1]), float(pos[k, 0] + sides[k]),
                     float(pos[k, 1] + sides[k]))}
            for k, (c, s) in enumerate(pairs)
        ]
        kind = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        bg_name = _BG_NAMES[int(rng.integers(len(_BG_NAMES)))]
        pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))] if kind == "textured" else None
        return {
            "category": cat,
            "objects": objects,
            "relation": None if relation is None else {"subject": 0, "relation": relation, "object": 1},
            "background": {"kind": kind, "color": bg_name, "rgb": BACKGROUND_COLORS[bg_name],
                           "pattern": pattern},
        }

    def _background(self, bg: dict, rng: np.random.Generator) -> Image.Image:
        """The supersampled background: a pale tone, optionally with a faint darker pattern."""
        W4, H4 = self.width * _SS, self.height * _SS
        rgb = bg["rgb"]
        pattern = bg["pattern"]
        if pattern == "noise":  # per-pixel shade at the final resolution, blown up to 4x
            shade = (rng.random((self.height, self.width, 1)) * _TEXTURE_DEPTH).astype(np.uint8)
            arr = np.asarray(rgb, dtype=np.uint8)[None, None, :] - shade
            return Image.fromarray(arr, "RGB").resize((W4, H4), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (W4, H4), rgb)
        if pattern is None:
            return canvas
        dark = tuple(v - _TEXTURE_DEPTH for v in rgb)
        S = min(self.height, self.width)
        half = max(1, round(S * (0.03 + 0.04 * rng.random()))) * _SS  # half period, 4x pixels
        if pattern == "checks":
            xq = (np.arange(W4) // half).astype(np.uint8) & 1
            yq = (np.arange(H4) // half).astype(np.uint8) & 1
            mask = Image.fromarray((yq[:, None] ^ xq[None, :]) * np.uint8(255), "L")
            canvas.paste(dark, (0, 0, W4, H4), mask)
            return canvas
        # stripes: horizontal, vertical or diagonal bands of width ``half``
        draw = ImageDraw.Draw(canvas)
        direction = int(rng.integers(4))
        if direction == 0:
            for y in range(0, H4, 2 * half):
                draw.rectangle((0, y, W4 - 1, y + half - 1), fill=dark)
        elif direction == 1:
            for x in range(0, W4, 2 * half):
                draw.rectangle((x, 0, x + half - 1, H4 - 1), fill=dark)
        else:  # diagonal, "/" or "\\"
            for u in range(-H4, W4, 2 * half):
                pts = [(u, 0), (u + half, 0), (u + half + H4, H4), (u + H4, H4)]
                if direction == 3:
                    pts = [(W4 - 1 - x, y) for x, y in pts]
                draw.polygon(pts, fill=dark)
        return canvas

    def _render(self, meta: dict, rng: np.random.Generator) -> Image.Image:
        canvas = self._background(meta["background"], rng)
        draw = ImageDraw.Draw(canvas)
        for o in meta["objects"]:
            box = tuple(round(v * _SS) for v in o["box"])
            draw_shape(draw, o["shape"], box, COLORS[o["color"]])
        # Lanczos; reducing_gap=2 first box-averages 2x2 blocks (same look, 2.5x faster).
        return canvas.resize((self.width, self.height), Image.Resampling.LANCZOS, reducing_gap=2.0)
