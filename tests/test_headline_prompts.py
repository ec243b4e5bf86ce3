"""Issue 20 §2: the headline SceneEval set is disjoint from every training caption of the shipped recipe.

Covers snapgen.eval.training_captions (the template-complete caption set), snapgen.eval.headline (the set and its
builder), snapgen.eval.prompt_sizing, and the alignment encoder's exclusion of eval prompts."""

import inspect
import re
from pathlib import Path

import pytest
import yaml

from snapgen.data.scenes import CATEGORIES, COLORS, HELDOUT_PAIRS, PLURALS, SHAPES, SceneDataset
from snapgen.eval import alignment
from snapgen.eval.headline import (HEADLINE_SET, HELDOUT_PER_CATEGORY, IN_DISTRIBUTION_SET, MAX_COSINE,
                                   PER_CATEGORY, build_headline)
from snapgen.eval.prompt_sizing import simulate_halfwidth
from snapgen.eval.sceneeval import PROMPT_SETS, load_prompts, prompt_path
from snapgen.eval.training_captions import (SHIPPED_CAPTION_STYLES, SHIPPED_CONFIGS, normalise_caption, overlap, scene_template_captions,
                                            shipped_training_captions)

ROOT = Path(__file__).resolve().parents[1]


def _mentions(text, word):
    return re.search(rf"\b{word}\b", text) is not None


def test_normalise_caption():
    assert normalise_caption("A Red  circle.") == normalise_caption("red circle") == "red circle"
    assert normalise_caption("an orange square!") == "orange square"
    assert normalise_caption("two shapes: a red star and a blue circle") == "two shapes red star and blue circle"


@pytest.mark.parametrize("seed", [0, 7])
def test_template_set_contains_every_drawn_training_caption(seed):
    # the real generator (rendering included), two seeds: the enumeration is the templates' exact closure
    ds = SceneDataset(32, length=1500, seed=seed, split="train")
    captions = scene_template_captions()
    missing = [ds[i].caption for i in range(len(ds)) if normalise_caption(ds[i].caption) not in captions]
    assert not missing, missing[:5]


def test_template_set_has_no_heldout_pair():
    captions = scene_template_captions()
    for c, s in HELDOUT_PAIRS:
        assert normalise_caption(f"a {c} {s}") not in captions
        assert normalise_caption(f"three {c} {PLURALS[s]}") not in captions
    assert normalise_caption("a purple star") in captions


def test_shipped_configs_draw_only_what_the_caption_set_covers():
    """If the recipe gains a data source the enumeration does not cover, this fails (extend training_captions)."""
    for cfg in SHIPPED_CONFIGS:
        data = yaml.safe_load((ROOT / cfg).read_text())["data"]
        if "spec" not in data:   # distillation: the captions of stage 2's latent cache
            assert data["cache"] == "runs/t2i_micro_v2/latents.safetensors", cfg
            continue
        for src in data["spec"]["sources"]:
            assert (src["type"], src["split"]) in {("scenes", "train"), ("emoji", "train")}, (cfg, src)
            if src["type"] == "scenes":   # a caption style overlap() does not check would void the headline
                assert src.get("captions", "templates") in SHIPPED_CAPTION_STYLES, (cfg, src)


def test_headline_is_disjoint_from_training_captions():
    train = shipped_training_captions()
    assert len(train) > 1_000_000
    prompts = [p["prompt"] for p in load_prompts(prompt_path(HEADLINE_SET))]
    assert overlap(prompts, train) == []
    assert len({normalise_caption(p) for p in prompts}) == len(prompts)   # no near-duplicate inside the set


def test_headline_set_is_balanced_and_valid():
    assert HEADLINE_SET in PROMPT_SETS and IN_DISTRIBUTION_SET in PROMPT_SETS
    prompts = load_prompts(prompt_path(HEADLINE_SET))   # validates every line (tags, include rules)
    assert len(prompts) == PER_CATEGORY * len(CATEGORIES)
    for tag in CATEGORIES:
        rows = [p for p in prompts if p["tag"] == tag]
        assert len(rows) == PER_CATEGORY, tag
        assert sum(p["source"] == "heldout_pair" for p in rows) == HELDOUT_PER_CATEGORY, tag
    for p in prompts:
        text = p["prompt"]
        assert p["nearest_cosine"] <= MAX_COSINE, p
        for r in p["include"]:
            assert r["class"] in SHAPES and r.get("color", "red") in COLORS
            assert _mentions(text, r["class"]) or _mentions(text, PLURALS[r["class"]]), text
            if "color" in r:
                assert _mentions(text, r["color"]), text
        held = any(_mentions(text, c) and (_mentions(text, s) or _mentions(text, PLURALS[s])) for c, s in HELDOUT_PAIRS)
        if p["source"] == "heldout_pair":
            assert held, text


def test_builder_is_deterministic_and_disjoint():
    a = build_headline(seed=3, per_category=6, heldout_per_category=2)
    assert a == build_headline(seed=3, per_category=6, heldout_per_category=2)
    assert overlap([p["prompt"] for p in a]) == []
    assert [p["tag"] for p in a].count("position") == 6


def test_existing_sets_overlap_as_documented():
    """docs/evaluation.md, "Prompt sets": the in-distribution set is training captions; paraphrases are not."""
    def n_overlap(name):
        return len(overlap([p["prompt"] for p in load_prompts(prompt_path(name))]))
    assert n_overlap("sceneeval") == 72
    assert n_overlap("sceneeval_paraphrase") == 0
    assert n_overlap("sceneeval_heldout") == 1   # "an orange square": an emoji alias


def test_alignment_encoder_never_trains_on_eval_prompts():
    excluded = alignment.eval_prompt_captions()
    for name in PROMPT_SETS:
        assert {normalise_caption(p["prompt"]) for p in load_prompts(prompt_path(name))} <= excluded
    assert inspect.signature(alignment.train_image_encoder).parameters["exclude_eval_prompts"].default is True
    spec = {"type": "scenes", "length": 1500, "resolution": 16, "seed": 0, "split": "train"}
    _, kept = alignment._load_pool(spec, excluded)
    assert not [c for c in kept if normalise_caption(c) in excluded]
    _, everything = alignment._load_pool(spec)
    assert len(everything) > len(kept)   # the filter had something to remove (the check can fail)


def test_sizing_simulation():
    assert simulate_halfwidth(PER_CATEGORY, 4, icc=0.3, n_sim=4, n_boot=200) <= 0.03
    assert simulate_halfwidth(12, 4, icc=0.3, n_sim=4, n_boot=200) > 0.03   # the old 72-prompt set does not


def test_stored_nearest_caption_reproduces():
    from snapgen.eval.alignment import SentenceEmbedder
    from snapgen.eval.headline import nearest_training_caption

    embedder = SentenceEmbedder()
    prompts = load_prompts(prompt_path(HEADLINE_SET))
    for p in (prompts[0], prompts[300], prompts[320]):   # held-out single object, colours, position
        objs = [(r["color"] if "color" in r else None, r["class"]) for r in p["include"]]
        if None in {c for c, _ in objs}:   # colours not in include: take them from the text (word before the shape)
            words = p["prompt"].split()
            objs = [(next(w for w, nxt in zip(words, words[1:]) if nxt.rstrip(",") in (s, PLURALS[s])), s)
                    for _, s in objs]
        if p["tag"] == "position":
            objs = objs[::-1]   # include lists the relation's object first, the prompt its subject
        caption, cos = nearest_training_caption(p["prompt"], objs, embedder)
        assert cos == pytest.approx(p["nearest_cosine"], abs=2e-3), (p, caption, cos)
        assert normalise_caption(caption) in shipped_training_captions()
