"""Issue 21 §2: the diverse scene captions (snapgen.data.scene_captions) -- true to the scene, many phrasings, one
grammar read three ways (sampling, per-scene enumeration, the regex of everything), and disjoint from the headline
evaluation prompts; the round-one templates unchanged; category weights."""

import collections
import copy
import re

import numpy as np
import pytest

from snapgen.data.scene_captions import (INVERSE, PHRASES, REL_WORDS, SENTENCES, SHAPE_WORDS, diverse_caption, diverse_captions,
                                         normalise_caption, template_caption)
from snapgen.data.scenes import CATEGORIES, COLORS, HELDOUT_PAIRS, SceneDataset
from snapgen.eval.sceneeval import load_prompts, prompt_path
from snapgen.eval.training_captions import SHIPPED_CAPTION_STYLES, overlap, scene_caption_pattern

N = 600


@pytest.fixture(scope="module")
def diverse():
    ds = SceneDataset(32, length=N, seed=5, captions="diverse")
    return [ds[i] for i in range(N)]


def test_every_drawn_caption_is_in_its_scenes_enumeration_and_the_pattern(diverse):
    pattern = scene_caption_pattern()
    for s in diverse:
        assert pattern.fullmatch(normalise_caption(s.caption)), s.caption
    for s in diverse[:60]:   # the exact enumeration (up to ~60k captions for a position scene)
        assert s.caption in set(diverse_captions(s.meta)), (s.meta["category"], s.caption)


def test_captions_name_only_the_scenes_objects(diverse):
    def words(obj):
        return {obj["color"], *(w for w, _ in SHAPE_WORDS[obj["shape"]]), *(p for _, p in SHAPE_WORDS[obj["shape"]])}

    for s in diverse:
        text = s.caption.replace("grey", "gray")
        objs = s.meta["objects"]
        for o in objs:
            assert re.search(rf"\b{o['color']}\b", text), (text, o)
            assert any(re.search(rf"\b{re.escape(w)}\b", text) for w in words(o) - {o["color"]}), (text, o)
        named = {c for c in COLORS if re.search(rf"\b{c}\b", text)}
        assert named == {o["color"] for o in objs}, (text, objs)


def test_relations_are_true_from_either_side():
    """A position caption never fits the mirrored scene (subject and object swapped): the words follow the order."""
    ds = SceneDataset(32, length=200, seed=2, captions="diverse", categories=["position"])
    for i in range(4):
        meta = ds[i].meta
        flipped = copy.deepcopy(meta)
        flipped["relation"]["relation"] = INVERSE[meta["relation"]["relation"]]
        true, false = set(diverse_captions(meta)), set(diverse_captions(flipped))
        assert true and not (true & false)
    # read back: the first-named object is the subject of the relation words said; both sides occur
    sides = collections.Counter()
    for i in range(200):
        s = ds[i]
        c0, c1 = (o["color"] for o in s.meta["objects"])
        if c0 == c1:
            continue
        text = s.caption.replace("grey", "gray")
        at = [re.search(rf"\b{c}\b", text).start() for c in (c0, c1)]
        said = {r for r, ws in REL_WORDS.items() for w in ws if re.search(rf"\b{w}\b", text)}
        assert len(said) == 1, text
        rel = s.meta["relation"]["relation"]
        first = 0 if at[0] < at[1] else 1
        assert said == {rel if first == 0 else INVERSE[rel]}, (text, rel)
        sides["subject first" if first == 0 else "object first"] += 1
    assert min(sides.values()) > 50, sides


def _skeleton(caption: str, meta: dict) -> str:
    """The caption's sentence frame: colour, shape, size and count words masked."""
    t = caption.replace("grey", "gray")
    for o in meta["objects"]:
        t = re.sub(rf"\b{o['color']}\b", "C", t)
        for w, p in sorted(SHAPE_WORDS[o["shape"]], key=lambda wp: -len(wp[0])):
            t = re.sub(rf"\b({re.escape(p)}|{re.escape(w)})\b", "S", t)
    t = re.sub(r"\b(small|little|medium-sized|medium|large|big)\b", "Z", t)
    return re.sub(r"\b(one|two|three|four|[1-4])\b", "#", t)


def test_many_phrasings(diverse):
    """Per scene: every sentence frame the grammar has (its exact enumeration) against every frame the templates
    reach (2,000 draws of template_caption saturate them); and almost no caption repeats in 600 draws."""
    by_cat = {}
    for s in diverse:
        by_cat.setdefault(s.meta["category"], s.meta)
    rng = np.random.default_rng(0)
    for cat, meta in by_cat.items():
        new = {_skeleton(c, meta) for c in diverse_captions(meta)}
        old = {_skeleton(template_caption(meta, rng), meta) for _ in range(2000)}
        assert len(new) >= 4 * len(old), (cat, len(new), len(old))
    n = collections.Counter(s.caption for s in diverse)
    assert n.most_common(1)[0][1] <= 3


def test_templates_style_is_the_round_one_default():
    """The default draws are the round-one templates, random number for random number: same images, same captions
    as an explicit captions="templates", and the caption is template_caption's."""
    a, b = SceneDataset(32, length=50, seed=1), SceneDataset(32, length=50, seed=1, captions="templates")
    c = SceneDataset(32, length=50, seed=1, captions="diverse")
    for i in range(50):
        sa, sb, sc = a[i], b[i], c[i]
        assert sa.caption == sb.caption and sa.meta == sb.meta
        assert np.array_equal(np.asarray(sa.image), np.asarray(sc.image))   # captions are drawn last
        assert sa.meta == sc.meta
    assert sum(a[i].caption != c[i].caption for i in range(50)) > 40
    rng = np.random.default_rng(0)
    assert template_caption(a[0].meta, None) == template_caption(a[0].meta, None)
    assert isinstance(diverse_caption(a[0].meta, rng), str)


def test_headline_prompts_are_not_diverse_captions():
    """The headline set stays unseen when the recipe switches to captions="diverse" (issue 20 §2's promise)."""
    prompts = [p["prompt"] for p in load_prompts(prompt_path("headline"))]
    assert overlap(prompts, styles=("templates", "diverse")) == []
    assert overlap(["a photo of a grey disc", "three round shapes that are red"], frozenset(),
                   styles=("diverse",)) == ["a photo of a grey disc", "three round shapes that are red"]
    assert overlap(["a grey disc"], frozenset()) == []   # templates only: the diverse regex is not consulted
    assert "diverse" not in SHIPPED_CAPTION_STYLES or overlap(prompts) == []


def test_training_split_never_names_a_heldout_pair(diverse):
    for s in diverse:
        for o in s.meta["objects"]:
            assert (o["color"], o["shape"]) not in set(HELDOUT_PAIRS)


def test_every_content_key_has_frames_and_bad_styles_fail():
    assert set(PHRASES) == set(SENTENCES) == {*CATEGORIES, "counting_one"}
    with pytest.raises(ValueError, match="captions style"):
        SceneDataset(32, captions="poetic")


def test_category_weights():
    ds = SceneDataset(16, length=3000, seed=0, category_weights={"position": 5.0})
    counts = collections.Counter(ds._sample_scene(np.random.default_rng([0, 1, i]))["category"] for i in range(3000))
    assert counts["position"] / 3000 == pytest.approx(0.5, abs=0.04)       # 5 / (5 + 5 x 1)
    assert counts["colors"] / 3000 == pytest.approx(0.1, abs=0.025)
    with pytest.raises(ValueError, match="category_weights"):
        SceneDataset(16, category_weights={"position": -1.0})
    with pytest.raises(ValueError, match="category_weights"):
        SceneDataset(16, categories=["colors"], category_weights={"position": 1.0})
