"""Measuring the scene detector (issue 20 §1): accuracy on real renders, clean and degraded, and on
touching objects; false objects per image on held-out negatives (:mod:`snapgen.eval.negatives`, types and
seeds never trained on) and on pure-noise images; calibration (expected calibration error). The figures
of the shipped weights are in their card (``card.json``, :func:`~snapgen.eval.detector.load_detector_card`).

Counted at the detection threshold ``min_confidence`` (GenEval's 0.3,
:data:`~snapgen.eval.sceneeval.MIN_CONFIDENCE`) unless said otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.scenes import COLORS, SHAPES, SceneDataset
from .degrade import DEGRADATIONS, degrade_image
from .detector import SceneDetector
from .negatives import HELDOUT_TYPES, negative_image, noise_image

__all__ = ["accuracy_report", "evaluate_detector", "evaluate_negatives", "evaluate_noise", "evaluate_touching",
           "expected_calibration_error"]

DETECTION_CONFIDENCE = 0.3   # GenEval's detection threshold (sceneeval.MIN_CONFIDENCE; no import cycle)
COUNTING_CONFIDENCE = 0.9    # GenEval's counting threshold (sceneeval.COUNTING_CONFIDENCE)


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



@torch.no_grad()
def evaluate_detector(det: SceneDetector, n: int = 300, split: str = "val", resolution: int = 64,
                      degrade: dict | None = None, seed: int = 0) -> dict[str, float]:
    """Per-attribute accuracy on renders of ``split``: ``count`` (images whose number of detections is
    right; ``count@0.3`` / ``count@0.9``: counting only detections at GenEval's detection / counting
    threshold), and over ground-truth objects matched to a detection: ``shape``, ``color``, ``both``;
    ``recall`` = matched objects / all objects. ``degrade``: kwargs of :func:`degrade_image` (None =
    clean renders, ``{}`` = random degradation as in training)."""
    ds = SceneDataset(resolution, seed=seed, split=split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    count_ok = count_det = count_cnt = n_obj = matched = shape_ok = color_ok = both_ok = 0
    for i in range(n):
        s = ds.generate(i)
        im = degrade_image(s.image, rng, **degrade) if degrade is not None else s.image
        dets = det.detect(im)
        objs = s.meta["objects"]
        count_ok += len(dets) == len(objs)
        count_det += sum(d.confidence >= DETECTION_CONFIDENCE for d in dets) == len(objs)
        count_cnt += sum(d.confidence >= COUNTING_CONFIDENCE for d in dets) == len(objs)
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
            "color": color_ok / m, "both": both_ok / m, "count@0.3": count_det / n, "count@0.9": count_cnt / n}



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



@torch.no_grad()
def evaluate_negatives(det: SceneDetector, n: int = 300, stream: str = "heldout", degrade: dict | None = None,
                       seed: int = 0, types: tuple[str, ...] | None = None,
                       min_confidence: float = DETECTION_CONFIDENCE) -> dict[str, float]:
    """False objects on negatives images (:func:`~snapgen.eval.negatives.negative_image` of ``stream``):
    ``false_per_image`` = detections at ``min_confidence`` not matched to the image's real shape, per image;
    ``false_per_image_heldout_types`` = those inside a negative of a :data:`HELDOUT_TYPES` type, per image;
    ``shape_recall`` = real shapes found with the right shape. ``false/<type>`` = false detections inside
    negatives of that type, per negative of the type."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
    false = false_ho = n_shapes = found = 0
    per_type: dict[str, list[int]] = {}
    for i in range(n):
        s = negative_image(i, seed=seed, stream=stream, types=types)
        im = degrade_image(s.image, rng, **degrade) if degrade is not None else s.image
        dets = [d for d in det.detect(im) if d.confidence >= min_confidence]
        match = _match(s.shapes, [d.box for d in dets])
        n_shapes += len(s.shapes)
        found += sum(j >= 0 and d.shape == s.shapes[j]["shape"] for d, j in zip(dets, match))
        fp = [d for d, j in zip(dets, match) if j < 0]
        false += len(fp)
        for neg in s.negatives:
            x0, y0, x1, y1 = neg["box"]
            k = sum(x0 - 1 <= d.center[0] <= x1 + 1 and y0 - 1 <= d.center[1] <= y1 + 1 for d in fp)
            per_type.setdefault(neg["type"], [0, 0])
            per_type[neg["type"]][0] += k
            per_type[neg["type"]][1] += 1
            false_ho += k if neg["type"] in HELDOUT_TYPES else 0
    out = {"false_per_image": false / n, "false_per_image_heldout_types": false_ho / n,
           "shape_recall": found / max(n_shapes, 1)}
    out.update({f"false/{t}": v[0] / v[1] for t, v in sorted(per_type.items())})
    return out


@torch.no_grad()
def evaluate_noise(det: SceneDetector, n: int = 100, stds: tuple[float, ...] = (20.0, 40.0, 60.0), seed: int = 0,
                   resolution: int = 64) -> dict[str, float]:
    """Objects per image on pure-noise images (:func:`~snapgen.eval.negatives.noise_image`): every
    detection counts (``any/std<s>``) and those at the detection threshold (``objects/std<s>``)."""
    out = {}
    for std in stds:
        dets = [det.detect(noise_image(i, std, resolution, seed)) for i in range(n)]
        out[f"any/std{std:g}"] = sum(len(d) for d in dets) / n
        out[f"objects/std{std:g}"] = sum(sum(o.confidence >= DETECTION_CONFIDENCE for o in d) for d in dets) / n
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE: the |accuracy - mean confidence| of ``bins`` equal-width confidence bins, weighted
    by their share of the samples (Guo et al., 2017)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.double().mean().item() * abs(correct[m].mean().item() - conf[m].double().mean().item())
    return float(ece)


def accuracy_report(det: SceneDetector, n: int = 300, touching: int = 120, negatives: int | None = None,
                    noise: int = 100) -> dict[str, dict[str, float]]:
    """Everything the detector card reports: :func:`evaluate_detector` on ``val`` and ``heldout`` under
    each of :data:`DEGRADATIONS`, :func:`evaluate_touching` (``touching`` images per cell),
    :func:`evaluate_negatives` (held-out stream, clean and randomly degraded; ``negatives`` images, default
    ``n``) and :func:`evaluate_noise` (``noise`` images per std)."""
    report = {}
    for split in ("val", "heldout"):
        for name, deg in DEGRADATIONS.items():
            report[f"{split}/{name}"] = evaluate_detector(det, n, split, degrade=deg)
    for same in (False, True):
        for overlap in (-0.08, 0.0, 0.1):
            for name in ("clean", "degraded"):
                key = f"touching/{'same' if same else 'different'}-color/overlap{overlap:+.2f}/{name}"
                report[key] = evaluate_touching(det, touching, overlap, same, DEGRADATIONS[name])
    for name in ("clean", "random"):
        report[f"negatives/heldout/{name}"] = evaluate_negatives(det, negatives or n, "heldout",
                                                                 DEGRADATIONS[name])
    if noise:
        report["noise"] = evaluate_noise(det, noise)
    return report
