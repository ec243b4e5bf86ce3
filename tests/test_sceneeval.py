"""SceneEval: the shipped scene detector, GenEval's scoring rules, the prompt sets, the failure report."""

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from snapgen.data.scenes import CATEGORIES, COLORS, HELDOUT_PAIRS, PLURALS, RELATIONS, SHAPES, SceneDataset
from snapgen.eval import detector as detmod
from snapgen.eval.detector import DEGRADED, DetectedObject, SceneDetector, degrade_image, load_detector
from snapgen.eval.sceneeval import (
    PROMPT_SETS,
    Verdict,
    evaluate_images,
    load_prompts,
    metadata_from_scene,
    prompt_path,
    relative_position,
    score_image,
    summarize,
    validate_metadata,
    write_failure_grids,
)

PER_CATEGORY = 30


@pytest.fixture(scope="module")
def detector():
    return load_detector()  # the shipped weights, models/evaluators/scene-detector


@pytest.fixture(scope="module")
def renders():
    """30 val + 30 heldout renders per category, with their GenEval metadata."""
    samples = []
    for split in ("val", "heldout"):
        for cat in CATEGORIES:
            ds = SceneDataset(64, split=split, categories=[cat], seed=0)
            samples += [ds[i] for i in range(PER_CATEGORY)]
    return [s.image for s in samples], [metadata_from_scene(s) for s in samples], samples


@pytest.fixture(scope="module")
def ceiling_results(detector, renders):
    images, metas, _ = renders
    return evaluate_images(images, metas, detector)


# ----------------------------------------------------------------------------------------------------
# Ceiling and floor on real renders.


def test_ceiling_on_renders(ceiling_results, renders):
    """Renders scored against their own metadata: SceneEval must (almost) always agree."""
    n = len(CATEGORIES) * PER_CATEGORY
    for split, res in (("val", ceiling_results[:n]), ("heldout", ceiling_results[n:])):
        summary = summarize(res)
        assert set(summary) == set(CATEGORIES) | {"overall"}
        fails = [(r["prompt"], r["reason"]) for r in res if not r["correct"]]
        assert summary["overall"] >= 0.98, (split, summary, fails[:5])


def test_floor_with_deranged_metadata(detector, renders):
    """The same renders with every image given another image's metadata score low."""
    images, metas, _ = renders
    rng = np.random.default_rng(0)
    n = len(metas)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            break
    results = evaluate_images(images, [metas[j] for j in perm], detector)
    summary = summarize(results)
    assert summary["overall"] <= 0.2, summary


# ----------------------------------------------------------------------------------------------------
# Scoring rules on hand-built detections.


def obj(shape, color, cx, cy, side=10.0, conf=0.9):
    h = side / 2
    return DetectedObject(shape, color, (cx - h, cy - h, cx + h, cy + h), (cx, cy), side * side, conf)


def meta(tag, include, prompt="p", exclude=None):
    m = {"tag": tag, "include": include, "prompt": prompt}
    if exclude is not None:
        m["exclude"] = exclude
    return validate_metadata(m)


def test_single_object_rule():
    m = meta("single_object", [{"class": "star", "count": 1}])
    assert score_image([obj("star", "red", 30, 30), obj("circle", "blue", 10, 10)], m)
    ok, reason = score_image([obj("circle", "red", 30, 30)], m)
    assert not ok and "star" in reason
    assert not score_image([], m)
    assert not score_image([obj("star", "red", 30, 30, conf=0.2)], m)  # below GenEval's threshold: ignored


def test_two_object_rule():
    m = meta("two_object", [{"class": "star", "count": 1}, {"class": "heart", "count": 1}])
    assert score_image([obj("heart", "red", 10, 10), obj("star", "blue", 50, 50)], m)
    ok, reason = score_image([obj("heart", "red", 10, 10), obj("circle", "blue", 50, 50)], m)
    assert not ok and reason == "expected star>=1, found 0"


def test_counting_rule_is_exact():
    m = meta("counting", [{"class": "heart", "count": 3}], exclude=[{"class": "heart", "count": 4}])
    three = [obj("heart", "green", x, 30) for x in (10, 30, 50)]
    assert score_image(three, m)
    assert score_image(three + [obj("circle", "green", 30, 55)], m)  # other classes do not count
    ok, reason = score_image(three[:2], m)
    assert not ok and "expected heart>=3, found 2" in reason
    ok, reason = score_image(three + [obj("heart", "green", 30, 55)], m)
    assert not ok and "expected heart<4, found 4" in reason
    # a counting prompt without an exclude is exact too (implicit exclude of count + 1)
    bare = meta("counting", [{"class": "heart", "count": 3}])
    assert score_image(three, bare) and not score_image(three + [obj("heart", "green", 30, 55)], bare)


def test_colors_rule():
    m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert score_image([obj("circle", "red", 30, 30)], m)
    ok, reason = score_image([obj("circle", "blue", 30, 30)], m)
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 blue"


def test_position_rule():
    # "a circle to the left of a square": GenEval lists the target first, the subject points at it
    m = meta("position", [{"class": "square", "count": 1},
                          {"class": "circle", "count": 1, "position": ["left of", 0]}])
    assert score_image([obj("circle", "red", 12, 30), obj("square", "blue", 50, 32)], m)
    ok, reason = score_image([obj("circle", "red", 50, 30), obj("square", "blue", 12, 32)], m)
    assert not ok and "expected circle left of square, found right of" in reason
    ok, reason = score_image([obj("square", "blue", 12, 32)], m)
    assert not ok and "expected circle>=1, found 0" in reason
    above = meta("position", [{"class": "square", "count": 1},
                              {"class": "circle", "count": 1, "position": ["above", 0]}])
    assert score_image([obj("circle", "red", 30, 10), obj("square", "blue", 32, 50)], above)  # y grows down
    assert not score_image([obj("circle", "red", 30, 50), obj("square", "blue", 32, 10)], above)


def test_relative_position_matches_geneval():
    a, b = (0, 0, 10, 10), (20, 20, 30, 30)
    assert relative_position(a, b) == {"left of", "above"}         # a clear diagonal: both
    assert relative_position(b, a) == {"right of", "below"}
    assert relative_position(a, a) == set()                          # same box: none
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()   # nearly the same place: none
    assert relative_position((0, 0, 10, 10), (9, 0, 19, 10)) == {"left of"}   # boxes may overlap
    assert relative_position((0, 0, 10, 10), (30, 4, 40, 14)) == {"left of"}


def test_color_attr_rule():
    m = meta("color_attr", [{"class": "square", "count": 1, "color": "red"},
                            {"class": "triangle", "count": 1, "color": "green"}])
    assert score_image([obj("square", "red", 10, 10), obj("triangle", "green", 50, 50)], m)
    ok, reason = score_image([obj("square", "green", 10, 10), obj("triangle", "red", 50, 50)], m)
    assert not ok
    assert "expected red square>=1, found 0 red; and 1 green" in reason
    assert "expected green triangle>=1, found 0 green; and 1 red" in reason


def test_verdict_and_detection_dicts():
    m = meta("single_object", [{"class": "star", "count": 1}])
    v = score_image([obj("star", "red", 30, 30).to_dict()], m)  # detections may be dicts (results files)
    assert isinstance(v, Verdict) and bool(v) and tuple(v) == (True, "")
    assert not Verdict(False, "x") and tuple(Verdict(False, "x")) == (False, "x")


# ----------------------------------------------------------------------------------------------------
# Metadata from scenes.


def test_metadata_from_scene_formats():
    ds = {c: SceneDataset(64, split="val", categories=[c], seed=1) for c in CATEGORIES}
    pos = ds["position"][0]
    m = metadata_from_scene(pos)
    rel = pos.meta["relation"]
    assert m["prompt"] == pos.caption
    assert m["include"] == [{"class": pos.meta["objects"][1]["shape"], "count": 1},
                            {"class": pos.meta["objects"][0]["shape"], "count": 1,
                             "position": [rel["relation"], 0]}]
    cnt = next(s for s in ds["counting"].stream() if len(s.meta["objects"]) == 3)
    m = metadata_from_scene(cnt)
    shape = cnt.meta["objects"][0]["shape"]
    assert m["include"] == [{"class": shape, "count": 3}] and m["exclude"] == [{"class": shape, "count": 4}]
    ca = metadata_from_scene(ds["color_attr"][0])
    assert all("color" in r for r in ca["include"])
    so = metadata_from_scene(ds["single_object"][0])
    assert "color" not in so["include"][0]                       # GenEval: single_object checks the class
    strict = metadata_from_scene(ds["single_object"][0], all_attributes=True)
    assert strict["include"][0]["color"] == ds["single_object"][0].meta["objects"][0]["color"]
    for c in CATEGORIES:
        validate_metadata(metadata_from_scene(ds[c][0]))       # consistent with its tag
        assert metadata_from_scene(ds[c][0].meta)["prompt"]     # bare meta: the canonical caption


# ----------------------------------------------------------------------------------------------------
# The detector.


def _key(objs):
    return sorted((o.shape, o.color) if isinstance(o, DetectedObject) else (o["shape"], o["color"])
                  for o in objs)


def test_detector_reads_renders(detector, renders):
    _, _, samples = renders
    for s in samples[::15]:   # a few of every category, both splits
        dets = detector.detect(s.image)
        assert _key(dets) == _key(s.meta["objects"]), s.caption
        for o in s.meta["objects"]:   # each object's box centre is found within a pixel
            cx, cy = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
            assert min(np.hypot(d.center[0] - cx, d.center[1] - cy) for d in dets) <= 1.5


def test_detector_on_degraded_renders(detector):
    ds = SceneDataset(64, split="heldout", seed=5)
    rng = np.random.default_rng(0)
    ok = sum(_key(detector.detect(degrade_image(s.image, rng, **DEGRADED))) == _key(s.meta["objects"])
             for s in (ds[i] for i in range(40)))
    assert ok >= 38


def test_detector_other_resolutions(detector):
    for res in ((48, 48), (96, 128)):
        ds = SceneDataset(res, split="val", seed=2)
        for i in range(6):
            s = ds[i]
            assert _key(detector.detect(s.image)) == _key(s.meta["objects"]), (res, s.caption)


def test_blank_images_have_no_objects(detector):
    assert detector.detect(Image.new("RGB", (64, 64), (245, 236, 212))) == []
    rng = np.random.default_rng(0)
    speckle = (np.array([230, 238, 248]) - rng.integers(0, 15, (64, 64, 1))).astype(np.uint8)
    assert detector.detect(Image.fromarray(speckle, "RGB")) == []
    assert detector.detect(np.full((32, 40, 3), 250, dtype=np.uint8)) == []   # arrays work too


def _touching(a, b, offset=0.0):
    """Two shapes drawn at 4x and downsampled: a = (shape, colour) on the left, b on the right, boxes
    of side 18 px touching (offset > 0 overlaps them)."""
    canvas = Image.new("RGB", (256, 256), (250, 247, 235))
    draw = ImageDraw.Draw(canvas)
    x = 10 + 18 - offset
    for (shape, color), x0 in ((a, 10), (b, x)):
        box = (x0 * 4, 88, (x0 + 18) * 4, 88 + 72)
        if shape == "circle":
            draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLORS[color])
        else:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLORS[color])
    return canvas.resize((64, 64), Image.Resampling.LANCZOS)


def test_detector_splits_touching_objects(detector):
    dets = sorted(detector.detect(_touching(("square", "red"), ("circle", "blue"))), key=lambda d: d.center[0])
    assert [(d.shape, d.color) for d in dets] == [("square", "red"), ("circle", "blue")]
    dets = detector.detect(_touching(("circle", "green"), ("circle", "green"), offset=1.0))
    assert [(d.shape, d.color) for d in dets] == [("circle", "green")] * 2


def test_save_load_round_trip(detector, renders, tmp_path):
    detector.save_pretrained(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = load_detector(tmp_path / "det")
    assert again.config == detector.config
    images = renders[0][::40]
    assert again.detect_batch(images) == detector.detect_batch(images)
    with pytest.raises(FileNotFoundError, match="python -m snapgen.eval.detector"):
        load_detector(tmp_path / "missing")


def test_untrained_detector_segments_but_guesses_shapes():
    """Segmentation (counts, colours) needs no weights; only the shape needs the trained CNN."""
    s = SceneDataset(64, split="val", categories=["counting"], seed=0)[0]
    dets = SceneDetector().detect(s.image)
    assert len(dets) == len(s.meta["objects"])
    assert {d.color for d in dets} == {s.meta["objects"][0]["color"]}
    assert detmod.default_detector_dir().name == "scene-detector"


# ----------------------------------------------------------------------------------------------------
# Prompt files.


def _write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"tag": "single_object", "include": [{"class": "star", "count": 1}], "prompt": "a red star"})


@pytest.mark.parametrize("line, message", [
    ('{"tag": "single_object", "include": [', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    (json.dumps({"tag": "portrait", "include": [{"class": "star", "count": 1}], "prompt": "x"}), "'tag'"),
    (json.dumps({"tag": "single_object", "include": [{"class": "stars", "count": 1}], "prompt": "x"}),
     r"include\[0\]\.class"),
    (json.dumps({"tag": "single_object", "include": [{"class": "star", "count": 0}], "prompt": "x"}),
     r"include\[0\]\.count"),
    (json.dumps({"tag": "colors", "include": [{"class": "star", "count": 1, "colour": "red"}], "prompt": "x"}),
     "unknown keys"),
    (json.dumps({"tag": "colors", "include": [{"class": "star", "count": 1}], "prompt": "x"}), "'color'"),
    (json.dumps({"tag": "position", "include": [{"class": "star", "count": 1},
                                                {"class": "heart", "count": 1, "position": ["near", 0]}],
                 "prompt": "x"}), "position must be"),
    (json.dumps({"tag": "two_object", "include": [{"class": "star", "count": 1}], "prompt": "x"}),
     "2 include entries"),
    (json.dumps({"tag": "single_object", "include": [{"class": "star", "count": 1}]}), "'prompt'"),
])
def test_loader_rejects_malformed_lines(tmp_path, line, message):
    path = _write(tmp_path, [GOOD, "", line])
    with pytest.raises(ValueError, match=message) as e:
        load_prompts(path)
    assert f"{path}:3:" in str(e.value)   # names the file and the line (blank lines are counted)


def test_loader_reads_good_files_and_rejects_empty(tmp_path):
    assert load_prompts(_write(tmp_path, [GOOD, GOOD])) == [json.loads(GOOD)] * 2
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(_write(tmp_path, [""]))


def _mentions(prompt, word):
    return re.search(rf"\b{word}\b", prompt) is not None


HELDOUT_RE = [re.compile(rf"\b{c} ({s}|{PLURALS[s]})\b|\b{s} (that is|colored|in) {c}\b") for c, s in HELDOUT_PAIRS]
REL_WORDS = {"left of": ("left", "right"), "right of": ("left", "right"),
             "above": ("above", "below", "over", "under", "top", "bottom", "higher", "underneath"),
             "below": ("above", "below", "over", "under", "top", "bottom", "higher", "underneath")}
NUMBERS = {2: ("two", "pair"), 3: ("three",), 4: ("four",)}


@pytest.mark.parametrize("name", [n for n in PROMPT_SETS if n != "headline"])  # headline: test_headline_prompts
def test_shipped_prompt_files(name):
    prompts = load_prompts(prompt_path(name))   # validates every line, tag consistency included
    tags = [p["tag"] for p in prompts]
    per_tag = 6 if name == "sceneeval_heldout" else 12
    assert {t: tags.count(t) for t in CATEGORIES} == {t: per_tag for t in CATEGORIES}
    for p in prompts:
        text = p["prompt"]
        for r in p["include"]:
            assert _mentions(text, r["class"]) or _mentions(text, PLURALS[r["class"]]), text
            if "color" in r:
                assert _mentions(text, r["color"]), text
            if "position" in r:
                assert any(_mentions(text, w) for w in REL_WORDS[r["position"][0]]), text
        if p["tag"] == "counting":
            assert any(_mentions(text, w) for w in NUMBERS[p["include"][0]["count"]]), text
        held = any(rx.search(text) for rx in HELDOUT_RE)
        assert held == (name == "sceneeval_heldout"), text


def test_prompt_sets_cover_the_world():
    main = load_prompts(prompt_path("sceneeval"))
    text = " ".join(p["prompt"] for p in main)
    assert all(_mentions(text, s) for s in SHAPES) and all(_mentions(text, c) for c in COLORS)
    assert {r["position"][0] for p in main for r in p["include"] if "position" in r} == set(RELATIONS)
    assert {p["include"][0]["count"] for p in main if p["tag"] == "counting"} == {2, 3, 4}
    para = load_prompts(prompt_path("sceneeval_paraphrase"))
    strip = [{k: v for k, v in p.items() if k != "prompt"} for p in main]
    assert [{k: v for k, v in p.items() if k != "prompt"} for p in para] == strip   # same metadata
    assert all(p["prompt"] != q["prompt"] and q["prompt"] not in p["prompt"] for p, q in zip(para, main))
    held = load_prompts(prompt_path("sceneeval_heldout"))
    for c, s in HELDOUT_PAIRS:   # every held-out pair in every category
        rx = re.compile(rf"\b{c} ({s}|{PLURALS[s]})\b|\b{s} (that is|colored|in) {c}\b")
        assert {p["tag"] for p in held if rx.search(p["prompt"])} == set(CATEGORIES), (c, s)


def test_unknown_prompt_set():
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_path("geneval")


# ----------------------------------------------------------------------------------------------------
# Summary and failure report.


def test_summarize_is_mean_over_categories():
    res = ([{"tag": "counting", "correct": True}] * 3 + [{"tag": "counting", "correct": False}]
           + [{"tag": "colors", "correct": False}])
    s = summarize(res)
    assert s == {"counting": 0.75, "colors": 0.0, "overall": 0.375}
    assert list(s) == ["counting", "colors", "overall"]   # CATEGORIES order
    with pytest.raises(ValueError):
        summarize([])


def test_failure_grids(detector, renders, ceiling_results, tmp_path):
    images, _, samples = renders
    a, b = 0, PER_CATEGORY * CATEGORIES.index("color_attr")
    # image a shows one object: ask for four of them; image b: swap its two objects' colours
    sa, sb = samples[a].meta["objects"], samples[b].meta["objects"]
    wrong_a = meta("counting", [{"class": sa[0]["shape"], "count": 4}], prompt="four of them")
    wrong_b = meta("color_attr", [{"class": sb[0]["shape"], "count": 1, "color": sb[1]["color"]},
                                  {"class": sb[1]["shape"], "count": 1, "color": sb[0]["color"]}],
                   prompt="colours swapped")
    results = evaluate_images([images[a], images[b]], [wrong_a, wrong_b], detector)
    assert [r["correct"] for r in results] == [False, False] and all(r["reason"] for r in results)
    assert [r["index"] for r in results] == [0, 1] and all(r["detections"] for r in results)
    json.dumps(results)   # JSON-ready
    paths = write_failure_grids(results, [images[a], images[b]], tmp_path, per_category=8)
    assert set(paths) == {"counting", "color_attr"}
    for p in paths.values():
        with Image.open(p) as im:
            assert im.size[0] >= 192 and im.size[1] > 192
    assert write_failure_grids(ceiling_results, images, tmp_path / "none") == {}   # nothing failed
    with pytest.raises(ValueError, match="2 images but 1 metadata"):
        evaluate_images([images[a], images[b]], [wrong_a], detector)
