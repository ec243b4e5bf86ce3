"""SceneDetector: finds the shapes in a scene image and reads each one's shape, colour, box and centre.

It is the object detector of SceneEval (:mod:`snapgen.eval.sceneeval`), GenEval's protocol on the
procedural world of :mod:`snapgen.data.scenes`, so it must work on *generated* images: blurrier and
noisier than the renders, with colours a little off, objects that may touch or overlap, stray smudges,
and things that are no shape at all (issue 20 §1: "a detector that can say no").

Design: segment, then classify
------------------------------
The world is flat shapes on a pale background, so finding objects needs no learning; only telling a
blurred hexagon from a blurred circle -- or from an ellipse, a bar, a letter -- does.

1. **Segmentation** (:mod:`snapgen.eval.segmentation`): background from the border ring, a noise guard
   (foreground thresholds raised on noisy backgrounds, so pure noise yields no candidate), hysteresis
   foreground, connected components, splitting of merged objects by colour, intensity valleys and necks;
   per object its box, centre, area and named colour (nearest in CIELAB); a flat-colour guard drops
   noise / texture patches and specks smaller than any scene object.
2. **Shape CNN** (:class:`ShapeNet`, ~61k parameters): the object's soft mask (colour-free, so held-out
   colour-shape pairs cannot leak through it) plus, as further channels (:data:`INPUTS`), its texture map
   (colour non-uniformity: noise patches are bright) and where the crop lies outside the image (a shape
   cut off by the border shows its cut), cropped square around the object and resized to 24 x 24,
   -> the six shapes **plus a reject class "not a shape"** (``config.reject``). A candidate whose most
   probable class is the reject class is not an object and is dropped. The ``confidence`` of a detection
   is the *calibrated* probability of its shape: softmax of the logits divided by ``config.temperature``
   (temperature scaling fitted on a held-out calibration split, :mod:`snapgen.eval.detector_train`), so
   GenEval's thresholds mean what they say: 0.3 to count as a detection, 0.9 for counting prompts
   (:data:`~snapgen.eval.sceneeval.COUNTING_CONFIDENCE`).
3. **Training** (:func:`train_detector`): crops from rendered ``split="train"`` scenes after random
   degradation (:mod:`snapgen.eval.degrade`), plus reject crops from the negatives generator
   (:mod:`snapgen.eval.negatives`: ellipses, bars, crosses, glyphs, irregular polygons, blobs, noise and
   texture patches, merged and cut-off shapes, smears), all through this very segmenter.
4. **Measured** (:mod:`snapgen.eval.detector_eval`): accuracy on real renders, false objects per image on
   held-out negatives (types and seeds never trained on) and on pure-noise images, calibration error;
   the figures of the shipped weights are in the **detector card** ``card.json`` beside them
   (:func:`load_detector_card`) and in ``docs/evaluation.md``.

Why not a learned detector (a small CNN predicting boxes, like GenEval's Mask2Former)? It would need
far more training than a few CPU minutes to be as exact as segmentation is here, and every failure
would be opaque; segmentation's failure modes (merged objects, faint objects) are few, visible in the
failure grids, and handled explicitly.

Reproducing the shipped weights and card (``models/evaluators/scene-detector``)::

    OMP_NUM_THREADS=1 python -m snapgen.eval.detector --out models/evaluators/scene-detector

(deterministic from ``--seed`` on one thread; a few minutes of one core; ``--eval-only`` re-measures.)
Measured (the card; ``docs/evaluation.md`` has the full table, old vs new): SceneEval on real renders
1.000 (val and held-out); shape accuracy on renders 1.000 clean, >= 0.994 degraded, ~0.95 "heavy";
false objects per image on held-out negatives 0.007 clean / 0.050 degraded (0.023 / 0.077 with the
mask-only classifier, 2.39 / 2.37 before the reject class); objects on pure noise (std 20 / 40 / 60) 0
(before: 0 / 14.7 / 26.6); top-label ECE on held-out crops 0.066 -> 0.003 with T = 0.613. Known limits: a
disc or square of noisy colour can still read as a circle or square once heavily blurred (0.27 false
objects per such patch, randomly degraded), and two same-colour squares touching along a
side make one rectangle, which is never split (it now reads as "not a shape" rather than one square).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .. import env
from ..data.scenes import COLORS, SHAPES
from ..nn.io import ModelIOMixin
from ..utils.config import JSONConfigMixin
from .degrade import DEGRADATIONS, DEGRADED, degrade_image
from .segmentation import Segmenter, srgb_to_lab

__all__ = [
    "CARD_NAME",
    "DEGRADATIONS",
    "DEGRADED",
    "REJECT",
    "DetectedObject",
    "DetectorConfig",
    "SceneDetector",
    "ShapeNet",
    "accuracy_report",
    "default_detector_dir",
    "degrade_image",
    "evaluate_detector",
    "evaluate_negatives",
    "evaluate_noise",
    "evaluate_touching",
    "load_detector",
    "load_detector_card",
    "train_detector",
]

REJECT = "not a shape"
"""The name of the reject class (the last output of :class:`ShapeNet` when ``config.reject``)."""
CARD_NAME = "card.json"
INPUTS = ("mask", "texture", "outside")
"""The classifier's possible input channels: ``mask`` = the object's soft mask; ``texture`` = its
per-pixel colour non-uniformity (:meth:`~snapgen.eval.segmentation.Segmenter._texmap`: a noise patch is
bright, a flat shape dark), so a blurred disc of noisy colour is no circle; ``outside`` = 1 where the
crop lies outside the image, so a shape cut off by the image border shows its straight cut against it
(both added after the first reject detector, whose remaining false objects were exactly these two)."""

# Training and evaluation live in their own modules (each under ~400 lines); their public names stay
# importable from here, lazily (they import this module).
_LAZY = {"train_detector": "detector_train", "main": "detector_train", "fit_temperature": "detector_train",
         "evaluate_detector": "detector_eval", "evaluate_touching": "detector_eval",
         "evaluate_negatives": "detector_eval", "evaluate_noise": "detector_eval",
         "accuracy_report": "detector_eval", "expected_calibration_error": "detector_eval"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_detector_dir() -> Path:
    """The shipped detector: ``$SNAPGEN_SCENE_DETECTOR`` or ``models/evaluators/scene-detector``."""
    return env.scene_detector_dir()


@dataclass(frozen=True)
class DetectedObject:
    """One detected object. ``box`` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive), ``center`` = the box
    centre (x, y), ``area`` = pixels inside the object's half-maximum contour, ``confidence`` = the shape
    classifier's calibrated probability for ``shape``."""

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
    reject: bool = True                # a "not a shape" class after the shapes (issue 20)
    inputs: tuple[str, ...] = INPUTS   # classifier input channels, a subset of INPUTS in that order
    temperature: float = 1.0           # calibration: softmax(logits / temperature)
    border_frac: float = 0.03          # width of the border ring that gives the background colour
    smooth_sigma: float = 0.5          # pre-smoothing of the distance map, px at 64 px (scales with size)
    t_low: float = 35.0                # RGB distance from the background: weak foreground
    t_high: float = 70.0               # strong foreground (a component must contain some)
    noise_k_low: float = 3.0           # noisy backgrounds: t_low >= this x the smoothed noise's distance
    noise_k_high: float = 4.5          # ... and t_high >= this x it (segmentation.Segmenter.thresholds)
    min_area_frac: float = 0.004       # smallest component, fraction of the image area (16 px at 64 x 64)
    min_object_frac: float = 0.008     # smallest object's half-max area (33 px at 64 x 64; segmentation.py)
    max_texture: float = 45.0          # an object's colour deviation (RGB) at most this ...
    texture_k: float = 1.5             # ... or this x the background noise's RGB distance, if larger
    # splitting merged objects (see snapgen.eval.segmentation)
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
        if not self.inputs or self.inputs[0] != "mask" or any(k not in INPUTS for k in self.inputs):
            raise ValueError(f"inputs must start with 'mask' and name only {INPUTS}, got {self.inputs}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def classes(self) -> tuple[str, ...]:
        """The classifier's outputs: the shapes, then :data:`REJECT` when ``reject``."""
        return self.shapes + ((REJECT,) if self.reject else ())


class ShapeNet(torch.nn.Module):
    """Crops (B, in_channels, S, S) in 0..1 (soft mask first) -> class logits (B, num_classes)."""

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64), hidden: int = 64,
                 crop_size: int = 24, in_channels: int = 1):
        super().__init__()
        layers, c_in = [], in_channels
        for c in channels:
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c_in = c
        self.features = torch.nn.Sequential(*layers)
        side = crop_size // 2 ** len(channels)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c_in * side * side, hidden),
                                        torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))


class SceneDetector(Segmenter, ModelIOMixin, torch.nn.Module):
    """Segment-then-classify detector (see the module docstring). ``detect(image)`` -> objects."""

    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = config or DetectorConfig()
        c = self.config
        self.net = ShapeNet(len(c.classes), c.channels, c.hidden, c.crop_size, len(c.inputs))
        if c.reject:  # an untrained detector never rejects: "not a shape" must be learned
            with torch.no_grad():
                self.net.head[-1].bias[-1] = -4.0
        self._palette = np.asarray(c.palette, dtype=np.float64).reshape(-1, 3)
        self._palette_lab = srgb_to_lab(self._palette)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)

    def crop(self, soft: np.ndarray, box: Sequence[float], jitter: np.ndarray | None = None,
             texmap: np.ndarray | None = None) -> torch.Tensor:
        """The classifier input (len(config.inputs), S, S) for one object: a square around ``box`` with a
        margin, of each of ``config.inputs`` (``texmap``: the region's, zeros if None).

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
        H, W = soft.shape
        planes = []
        for name in c.inputs:
            if name == "mask":
                planes.append(ndimage.map_coordinates(soft, [gy, gx], order=1, mode="constant", cval=0.0))
            elif name == "texture":
                planes.append(np.zeros_like(gy) if texmap is None else
                              ndimage.map_coordinates(texmap, [gy, gx], order=1, mode="constant", cval=0.0))
            else:  # outside: pixel centres beyond the image
                planes.append(((gy < -0.5) | (gy > H - 0.5) | (gx < -0.5) | (gx > W - 0.5)).astype(np.float64))
        x = torch.from_numpy(np.stack(planes).astype(np.float32))[None]
        x = F.interpolate(x, size=(c.crop_size, c.crop_size), mode="area") if n != c.crop_size else x
        return x[0]

    @torch.no_grad()
    def probabilities(self, crops: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities (B, len(config.classes)) of crops; ``calibrated`` divides the logits by
        ``config.temperature`` first."""
        was_training = self.training
        self.eval()
        logits = self.net(crops)
        self.train(was_training)
        return torch.softmax(logits / (self.config.temperature if calibrated else 1.0), -1)

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
        probs = self.probabilities(torch.stack([self.crop(r.soft, r.box, texmap=r.texmap) for r in flat]))
        conf, idx = probs.max(-1)
        out, i = [], 0
        for rs in regions:
            objs = []
            for r in rs:
                k = int(idx[i])
                i += 1
                if k >= len(self.config.shapes):   # "not a shape": no object
                    continue
                x0, y0, x1, y1 = r.box
                objs.append(DetectedObject(shape=self.config.shapes[k], color=r.color, box=r.box,
                                           center=((x0 + x1) / 2, (y0 + y1) / 2), area=r.area,
                                           confidence=float(conf[i - 1])))
            objs.sort(key=lambda o: -o.confidence)
            out.append(objs)
        return out


def load_detector(path: str | os.PathLike | None = None) -> SceneDetector:
    """The trained detector from ``path`` (default: :func:`default_detector_dir`), in eval mode."""
    path = Path(path) if path is not None else default_detector_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"scene detector not found at {path}; train one with "
                                f"`python -m snapgen.eval.detector --out {path}`")
    return SceneDetector.from_pretrained(path).eval()


def load_detector_card(path: str | os.PathLike | None = None) -> dict:
    """The detector card: the measured figures of a trained detector (accuracy on real renders, false
    objects per image on held-out negatives and pure noise, calibration error, thresholds, the command
    that produced it). ``path``: a detector folder or its ``card.json``; None = the shipped detector."""
    path = Path(path) if path is not None else default_detector_dir()
    if path.is_dir():
        path = path / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"detector card not found at {path}; measure and write it with "
                                f"`python -m snapgen.eval.detector --eval-only --out {path.parent}`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    from snapgen.eval.detector_train import main

    main()
