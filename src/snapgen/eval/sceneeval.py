"""SceneEval: GenEval's scoring protocol on the procedural scene world of :mod:`snapgen.data.scenes`.

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting the objects in its images and
checking each prompt's requirements: the objects' classes, counts, colours and relative positions. Its
detector (Mask2Former on COCO) and colour classifier (CLIP) are swapped here for
:class:`~snapgen.eval.detector.SceneDetector`, which knows this world's six shapes and ten colours; the
prompt format and the rules are GenEval's.

Prompt metadata (GenEval's own JSONL format, one object per line)::

    {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                      {"class": "triangle", "count": 1, "color": "green"}],
     "prompt": "a red square and a green triangle"}

* ``tag``: one of :data:`~snapgen.data.scenes.CATEGORIES` (single_object, two_object, counting, colors,
  position, color_attr); the per-category accuracy is reported per tag.
* ``include``: required object groups. ``class`` is a shape, ``count`` (>= 1) how many the image must
  have at least, ``color`` (optional) the colour all of them must have, ``position`` (optional)
  ``[relation, index]``: every object of this group must stand in ``relation`` ("left of", "right of",
  "above", "below") to every object of group ``include[index]``.
* ``exclude`` (optional): ``[{"class": c, "count": n}]`` -- the image must have *fewer* than ``n``
  objects of class ``c``. GenEval's counting prompts carry ``exclude`` with ``count + 1``, which makes the
  count exact; a ``counting`` prompt without an ``exclude`` for its class gets that implicit exclude here,
  so counting is always exact.
* ``prompt``: the text given to the model. Other top-level keys are allowed and ignored.

Scoring rules (:func:`score_image`, GenEval's ``evaluate``):

* Detections with ``confidence < min_confidence`` (default 0.3, GenEval's threshold) are ignored; for
  ``counting`` prompts the threshold is ``counting_confidence`` instead (default 0.9, GenEval's
  ``counting_threshold``), as in GenEval. The detector's confidences are calibrated probabilities
  (temperature scaling, :mod:`snapgen.eval.detector_train`), so both thresholds mean what GenEval's mean.
* For each include group, the ``count`` most confident detections of its class are taken; fewer than
  ``count`` fails ("expected star>=1, found 0"). With a ``color``, all of those must have it.
* ``position``: GenEval's :func:`relative_position` on the two objects' boxes: the centre offset, with
  each axis shrunk by ``0.1 x`` (sum of the two boxes' sizes on that axis), normalised by the centre
  distance; "left of" holds if the x component is < -0.5, "right of" if > 0.5, "above" if y < -0.5,
  "below" if y > 0.5 (image y grows downwards). A render's relations always pass this test (scenes keep
  the two boxes apart on the main axis and the cross-axis offset under half the main one).
* ``exclude``: fails if ``count`` or more detections of the class remain.

Per tag, what that checks: ``single_object`` -- an object of the class exists; ``two_object`` -- both
classes exist; ``counting`` -- exactly ``count`` objects of the class; ``colors`` -- the object of the
class has the colour; ``position`` -- both classes exist and the relation holds; ``color_attr`` -- both
classes exist, each with its own colour (attribute binding). As in GenEval, the colour words in
single_object / two_object / counting / position prompts are not checked (pass
``all_attributes=True`` to :func:`metadata_from_scene` for a stricter variant that checks every colour).

:func:`summarize` reports the accuracy per tag and ``overall`` = the mean over tags (GenEval's overall
score), so each category weighs the same whatever its number of prompts.

Prompt sets (``src/snapgen/eval/prompts/``, see :func:`prompt_path`): ``sceneeval.jsonl`` (72 prompts,
12 per tag, in the training captions' style, with no held-out colour-shape pair),
``sceneeval_heldout.jsonl`` (36 prompts, 6 per tag, each naming a held-out pair of
:data:`~snapgen.data.scenes.HELDOUT_PAIRS`) and ``sceneeval_paraphrase.jsonl`` (the same 72 metadata as
``sceneeval.jsonl``, line for line, phrased in ways the training captions never are); ``headline.jsonl``
(480 prompts never seen in training, :mod:`snapgen.eval.headline`; ``sceneeval.jsonl`` is in-distribution).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.base import Sample
from ..data.scenes import CATEGORIES, COLORS, RELATIONS, SHAPES, describe
from .detector import DetectedObject, SceneDetector
from .failure_grids import write_failure_grids  # noqa: F401  (its home was here; re-exported)

__all__ = [
    "COUNTING_CONFIDENCE",
    "MIN_CONFIDENCE",
    "POSITION_THRESHOLD",
    "PROMPT_SETS",
    "Verdict",
    "evaluate_images",
    "load_prompts",
    "metadata_from_scene",
    "prompt_path",
    "relative_position",
    "save_prompts",
    "score_image",
    "summarize",
    "validate_metadata",
    "write_failure_grids",
]

MIN_CONFIDENCE = 0.3       # GenEval's detection threshold
COUNTING_CONFIDENCE = 0.9  # GenEval's threshold for counting prompts (its counting_threshold)
POSITION_THRESHOLD = 0.1   # GenEval's POSITION_THRESHOLD
PROMPT_SETS = ("sceneeval", "sceneeval_heldout", "sceneeval_paraphrase", "headline")  # headline: eval/headline.py
_PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def prompt_path(name: str = "sceneeval") -> Path:
    """The shipped prompt file of a set in :data:`PROMPT_SETS`."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")
    return _PROMPT_DIR / f"{name}.jsonl"


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`score_image`: truthy iff correct; unpacks as ``correct, reason``."""

    correct: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.correct

    def __iter__(self):
        yield self.correct
        yield self.reason


# ----------------------------------------------------------------------------------------------------
# Metadata: validation, loading, conversion from scenes.


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate_metadata(meta: Any, where: str = "metadata", check_tag: bool = True) -> dict:
    """Check one metadata object (format, vocabulary and -- with ``check_tag`` -- that its requirements
    are what its tag means); returns it. Raises ``ValueError`` naming ``where`` and the problem."""

    def bad(msg: str):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(meta, Mapping):
        bad(f"expected a JSON object, got {type(meta).__name__}")
    tag = meta.get("tag")
    if tag not in CATEGORIES:
        bad(f"'tag' must be one of {list(CATEGORIES)}, got {tag!r}")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        bad("'prompt' must be a non-empty string")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        bad("'include' must be a non-empty list of object requirements")
    for i, req in enumerate(include):
        if not isinstance(req, Mapping):
            bad(f"include[{i}] must be an object, got {type(req).__name__}")
        unknown = sorted(set(req) - _INCLUDE_KEYS)
        if unknown:
            bad(f"include[{i}] has unknown keys {unknown}; allowed: {sorted(_INCLUDE_KEYS)}")
        if req.get("class") not in SHAPES:
            bad(f"include[{i}].class must be one of {list(SHAPES)}, got {req.get('class')!r}")
        if not _is_count(req.get("count")):
            bad(f"include[{i}].count must be a positive integer, got {req.get('count')!r}")
        if "color" in req and req["color"] not in COLORS:
            bad(f"include[{i}].color must be one of {list(COLORS)}, got {req['color']!r}")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or isinstance(pos[1], bool)
                    or not 0 <= pos[1] < len(include) or pos[1] == i):
                bad(f"include[{i}].position must be [relation, index] with relation in {list(RELATIONS)} "
                    f"and index another include's position (0..{len(include) - 1}), got {pos!r}")
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        bad("'exclude' must be a list")
    for i, req in enumerate(exclude):
        if not isinstance(req, Mapping) or set(req) != _EXCLUDE_KEYS:
            bad(f"exclude[{i}] must be an object with exactly the keys {sorted(_EXCLUDE_KEYS)}, got {req!r}")
        if req["class"] not in SHAPES:
            bad(f"exclude[{i}].class must be one of {list(SHAPES)}, got {req['class']!r}")
        if not _is_count(req["count"]):
            bad(f"exclude[{i}].count must be a positive integer, got {req['count']!r}")
    if check_tag:
        _check_tag(meta, bad)
    return dict(meta)


def _check_tag(meta: Mapping, bad) -> None:
    tag, inc, exc = meta["tag"], meta["include"], meta.get("exclude", [])
    n = {"single_object": 1, "colors": 1, "counting": 1}.get(tag, 2)
    if len(inc) != n:
        bad(f"a {tag} prompt has {n} include entr{'y' if n == 1 else 'ies'}, got {len(inc)}")
    if tag != "counting" and any(r["count"] != 1 for r in inc):
        bad(f"a {tag} prompt asks for one object per include (count 1)")
    if n == 2 and inc[0]["class"] == inc[1]["class"]:
        bad(f"a {tag} prompt names two different classes, got {inc[0]['class']!r} twice")
    positions = [i for i, r in enumerate(inc) if "position" in r]
    if tag == "position":
        if len(positions) != 1:
            bad("a position prompt has exactly one include with a 'position'")
    elif positions:
        bad(f"only position prompts carry a 'position' (found one in a {tag} prompt)")
    if tag in ("colors", "color_attr") and not all("color" in r for r in inc):
        bad(f"every include of a {tag} prompt has a 'color'")
    if tag == "counting":
        cls, cnt = inc[0]["class"], inc[0]["count"]
        if any(e["class"] == cls and e["count"] != cnt + 1 for e in exc):
            bad(f"a counting prompt's exclude for its class must have count {cnt + 1} (exact count)")
    elif exc:
        bad(f"only counting prompts carry an 'exclude' (found one in a {tag} prompt)")


def load_prompts(path: str | os.PathLike, check_tag: bool = True) -> list[dict]:
    """Read a GenEval-format JSONL prompt file (blank lines are skipped); every line is validated
    (:func:`validate_metadata`) and a malformed one raises ``ValueError`` naming ``path:line``."""
    from ..utils.jsonl import read_jsonl

    return [validate_metadata(meta, where, check_tag) for where, meta in read_jsonl(path)]


def save_prompts(prompts: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Write prompts as GenEval JSONL (each validated first)."""
    lines = [json.dumps(validate_metadata(p, f"prompt {i}"), ensure_ascii=False) for i, p in enumerate(prompts)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def metadata_from_scene(scene: Sample | Mapping, prompt: str | None = None,
                        all_attributes: bool = False) -> dict:
    """GenEval metadata for a rendered scene (a :class:`Sample`, or its ``meta``).

    ``prompt`` defaults to the sample's caption (or the canonical :func:`~snapgen.data.scenes.describe`
    caption for a bare ``meta``). What is checked follows the scene's category, as in GenEval (see the
    module docstring); ``all_attributes=True`` also requires every object's colour."""
    if isinstance(scene, Sample):
        meta, prompt = scene.meta, scene.caption if prompt is None else prompt
    else:
        meta = scene
    prompt = describe(meta) if prompt is None else prompt
    tag, objs = meta["category"], meta["objects"]

    def req(o: Mapping, count: int = 1, color: bool = False) -> dict:
        r = {"class": o["shape"], "count": count}
        if color or all_attributes:
            r["color"] = o["color"]
        return r

    out: dict[str, Any] = {"tag": tag}
    if tag in ("single_object", "colors"):
        out["include"] = [req(objs[0], color=tag == "colors")]
    elif tag == "counting":
        n = len(objs)
        out["include"] = [req(objs[0], count=n)]
        out["exclude"] = [{"class": objs[0]["shape"], "count": n + 1}]
    elif tag in ("two_object", "color_attr"):
        out["include"] = [req(objs[0], color=tag == "color_attr"), req(objs[1], color=tag == "color_attr")]
    elif tag == "position":
        rel = meta["relation"]
        target = req(objs[rel["object"]])
        subject = {**req(objs[rel["subject"]]), "position": [rel["relation"], 0]}
        out["include"] = [target, subject]
    else:
        raise ValueError(f"unknown scene category {tag!r}; expected one of {CATEGORIES}")
    out["prompt"] = prompt
    return out


# ----------------------------------------------------------------------------------------------------
# Scoring.


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of box A relative to box B (boxes ``(x0, y0, x1, y1)``, y down)."""
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    off = ((ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2)
    dims = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    revised = [max(abs(o) - threshold * d, 0.0) * math.copysign(1.0, o) for o, d in zip(off, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*off)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _as_detection(d) -> DetectedObject:
    return d if isinstance(d, DetectedObject) else DetectedObject.from_dict(d)


def score_image(detections: Iterable[DetectedObject | Mapping], metadata: Mapping,
                min_confidence: float = MIN_CONFIDENCE,
                position_threshold: float = POSITION_THRESHOLD,
                counting_confidence: float = COUNTING_CONFIDENCE) -> Verdict:
    """GenEval's verdict for one image's detections against one prompt's metadata (module docstring).

    Returns a :class:`Verdict` (truthy iff correct; ``ok, reason = score_image(...)``); the reason lists
    every failed requirement, one per line."""
    dets = [_as_detection(d) for d in detections]
    threshold = counting_confidence if metadata.get("tag") == "counting" else min_confidence
    dets = sorted((d for d in dets if d.confidence >= threshold), key=lambda d: -d.confidence)
    by_class: dict[str, list[DetectedObject]] = {}
    for d in dets:
        by_class.setdefault(d.shape, []).append(d)
    include = metadata["include"]
    exclude = list(metadata.get("exclude", []))
    if metadata.get("tag") == "counting":  # counting is exact: an implicit exclude of count + 1
        for r in include:
            if not any(e["class"] == r["class"] for e in exclude):
                exclude.append({"class": r["class"], "count": r["count"] + 1})

    reasons: list[str] = []
    groups: list[list[DetectedObject] | None] = []
    for req in include:
        cls, n = req["class"], req["count"]
        found = by_class.get(cls, [])[:n]
        if len(found) < n:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
            groups.append(None)
            continue
        if "color" in req:
            colors = [d.color for d in found]
            k = colors.count(req["color"])
            if k < n:
                others = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                reasons.append(f"expected {req['color']} {cls}>={n}, found {k} {req['color']}; and {others}")
                groups.append(None)
                continue
        groups.append(found)
    for req, group in zip(include, groups):
        if "position" not in req or group is None:
            continue
        rel, target = req["position"]
        if groups[target] is None:
            reasons.append(f"no target for {req['class']} to be {rel}")
            continue
        bad = next(((d, t) for d in group for t in groups[target]
                    if rel not in relative_position(d.box, t.box, position_threshold)), None)
        if bad is not None:
            true = relative_position(bad[0].box, bad[1].box, position_threshold)
            reasons.append(f"expected {req['class']} {rel} {include[target]['class']}, found "
                           f"{' and '.join(sorted(true)) or 'no clear relation'}")
    for req in exclude:
        found = by_class.get(req["class"], [])
        if len(found) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(found)}")
    return Verdict(not reasons, "\n".join(reasons))


def evaluate_images(images: Sequence[Image.Image], metadata: Sequence[Mapping], detector: SceneDetector,
                    min_confidence: float = MIN_CONFIDENCE, batch_size: int = 32,
                    counting_confidence: float = COUNTING_CONFIDENCE) -> list[dict]:
    """Detect and score every image against its metadata (same order). Each result is a JSON-ready dict:
    ``index, tag, prompt, correct, reason, detections`` (a list of :class:`DetectedObject` dicts)."""
    if len(images) != len(metadata):
        raise ValueError(f"got {len(images)} images but {len(metadata)} metadata entries")
    results = []
    for start in range(0, len(images), batch_size):
        batch = detector.detect_batch(images[start:start + batch_size])
        for k, dets in enumerate(batch):
            i = start + k
            meta = metadata[i]
            correct, reason = score_image(dets, meta, min_confidence, counting_confidence=counting_confidence)
            results.append({"index": i, "tag": meta["tag"], "prompt": meta["prompt"], "correct": correct,
                            "reason": reason, "detections": [d.to_dict() for d in dets]})
    return results


def summarize(results: Sequence[Mapping]) -> dict[str, float]:
    """Accuracy per tag (in :data:`CATEGORIES` order, tags present only) and ``overall`` = their mean."""
    if not results:
        raise ValueError("no results to summarize")
    per: dict[str, list[bool]] = {}
    for r in results:
        per.setdefault(r["tag"], []).append(bool(r["correct"]))
    tags = [t for t in CATEGORIES if t in per] + sorted(t for t in per if t not in CATEGORIES)
    out = {t: sum(per[t]) / len(per[t]) for t in tags}
    out["overall"] = sum(out.values()) / len(out)
    return out
