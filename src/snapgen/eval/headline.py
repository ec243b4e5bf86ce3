"""The headline SceneEval set: prompts the shipped model never saw in training (issue 20 §2).

``src/snapgen/eval/prompts/headline.jsonl`` (:data:`HEADLINE_SET`) is built by :func:`build_headline`
(``python -m snapgen.eval.headline``; deterministic given the seed) and holds :data:`PER_CATEGORY` prompts
for each of the six categories, in GenEval's metadata format with the same tags and ``include`` rules as
``sceneeval.jsonl`` (made by :func:`~snapgen.eval.sceneeval.metadata_from_scene`). Every prompt is

* phrased with a sentence frame no training template uses (:data:`FRAMES`: other word orders, synonyms,
  "there is exactly one ...", "a drawing showing ...", "two stars, both purple", new relation words such
  as "beneath" or "further left than"), and
* for :data:`HELDOUT_PER_CATEGORY` of them, about a colour/shape pair the scene world holds out of
  training (:data:`~snapgen.data.scenes.HELDOUT_PAIRS`; in ``counting`` every object has it), so those
  prompts are also unseen *combinations*. The extra key ``source`` says which: ``"new_phrasing"`` (only
  training colour/shape pairs) or ``"heldout_pair"``.

A drawn prompt is kept only if its normalised form (:func:`~snapgen.eval.training_captions.normalise_caption`)
is no caption of the shipped recipe (:func:`~snapgen.eval.training_captions.shipped_training_captions`, the
template-complete superset) and not already in the set, and, when similarities are computed, if its MiniLM
sentence cosine to its nearest training caption is at most :data:`MAX_COSINE`. The nearest caption and the
cosine are stored with each prompt (``nearest_training_caption``, ``nearest_cosine``; ignored by scoring).
Nearest among: every emoji training caption, and the scene template captions (every template, every
background word, no size words) about the prompt's own objects in both orders, where a held-out pair is
replaced by each of 3 training colours of the same shape (the scene templates never name a held-out pair).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.scene_captions import _article
from ..data.scenes import COLORS, HELDOUT_PAIRS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES
from .sceneeval import metadata_from_scene, save_prompts
from .training_captions import _iter_scene_captions, emoji_training_captions, normalise_caption, overlap, \
    shipped_training_captions

__all__ = ["FRAMES", "HEADLINE_SET", "HELDOUT_PER_CATEGORY", "IN_DISTRIBUTION_SET", "MAX_COSINE", "PER_CATEGORY",
           "build_headline", "nearest_training_caption"]

HEADLINE_SET = "headline"            # the headline: unseen phrasings + held-out combinations
IN_DISTRIBUTION_SET = "sceneeval"    # secondary row: the training captions' own style (overlaps them)
PER_CATEGORY = 80                    # x 4 seeds: overall 95% interval <= +-0.03 (prompt_sizing, docs)
HELDOUT_PER_CATEGORY = 30
MAX_COSINE = 0.98

FRAMES: dict[str, tuple[str, ...]] = {
    "single_object": (
        "there is exactly one {n} in the picture", "a drawing showing {A}", "a simple illustration of {A}",
        "{A}, drawn flat on a light background", "the image contains {A}", "a lone {n}",
        "a minimal graphic of {A}", "somewhere in the frame: {A}", "draw {A}", "a single {n} and nothing else",
        "{A} all by itself", "look, {A}"),
    "colors": (
        "a {s} painted {c}", "a {c}-coloured {s}", "a {s}, and it is {c}", "one {s} in a {c} colour",
        "a {s} filled with {c}", "the colour of the {s} is {c}", "a {s} whose colour is {c}",
        "something {c}: a {s}", "a {s} shaded {c}", "a {s} of {c} colour"),
    "counting": (
        "{num} {P}, all of them {c}", "a group of {num} {c} {P}", "{num} {c} {P} and nothing else",
        "count them: {num} {c} {P}", "exactly {num} {P} in {c}", "the picture shows {num} {c} {P}",
        "{num} identical {c} {P}", "a set of {num} {c} {P}", "we see {num} {c} {P} here"),
    "two_object": (
        "{A} next to {B}", "{A} as well as {B}", "both {A} and {B}", "{A} with {B} beside it",
        "a drawing of {A} plus {B}", "the image contains {A} and also {B}", "{A} alongside {B}",
        "one {n0} and one {n1}", "a picture where {A} meets {B}", "{B}, and also {A}"),
    "color_attr": (
        "{A} next to {B}", "{A} beside {B}", "a {s0} coloured {c0} and a {s1} coloured {c1}",
        "one {c0} {s0}, one {c1} {s1}", "a {s0} in {c0} and a {s1} in {c1}", "{A}, plus {B}",
        "the {s0} is {c0} and the {s1} is {c1}", "a {c0}-coloured {s0} and a {c1}-coloured {s1}",
        "{A} as well as {B}", "a {s0} painted {c0} beside a {s1} painted {c1}"),
}
_COUNT_ONE = ("just one {c} {s}", "a single {c} {s}, only one", "only one {s}, and it is {c}")
_COUNT_TWO = ("two {P}, both {c}", "a pair of {c} {P}")
POSITION_FRAMES: dict[str, tuple[str, ...]] = {
    "left of": ("{A} sits to the left of {B}", "to the left of {B} is {A}", "{B} with {A} on its left",
                "{A} on the left side of {B}", "{A} further left than {B}"),
    "right of": ("{A} sits to the right of {B}", "to the right of {B} is {A}", "{B} with {A} on its right",
                 "{A} on the right side of {B}", "{A} further right than {B}"),
    "above": ("{A} sits above {B}", "{A} higher up than {B}", "{B} with {A} over it", "{A} directly over {B}",
              "above {B} is {A}"),
    "below": ("{A} beneath {B}", "{A} underneath {B}", "{B} with {A} under it", "{A} lower down than {B}",
              "below {B} is {A}"),
}
FRAMES["position"] = tuple(f for fs in POSITION_FRAMES.values() for f in fs)

_HELD = frozenset(HELDOUT_PAIRS)
_TRAIN = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in _HELD)
_ALL = tuple((c, s) for c in COLORS for s in SHAPES)


def _objects(cat: str, heldout: bool, rng: np.random.Generator) -> tuple[list[tuple[str, str]], str | None]:
    """(colour, shape) per object and the relation, under the category's constraints."""
    if cat in ("single_object", "colors", "counting"):
        pool = HELDOUT_PAIRS if heldout else _TRAIN
        pair = pool[int(rng.integers(len(pool)))]
        n = int(rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.3, 0.3])) if cat == "counting" else 1
        return [pair] * n, None
    while True:
        first = HELDOUT_PAIRS[int(rng.integers(6))] if heldout else _TRAIN[int(rng.integers(len(_TRAIN)))]
        other = _ALL[int(rng.integers(len(_ALL)))] if heldout else _TRAIN[int(rng.integers(len(_TRAIN)))]
        pairs = [first, other] if rng.random() < 0.5 else [other, first]
        if pairs[0][1] == pairs[1][1] or (cat == "color_attr" and pairs[0][0] == pairs[1][0]):
            continue
        rel = RELATIONS[int(rng.integers(4))] if cat == "position" else None
        return pairs, rel


def _phrase(cat: str, pairs, rel, rng: np.random.Generator) -> str:
    (c0, s0) = pairs[0]
    f = dict(c=c0, s=s0, n=f"{c0} {s0}", A=_article(f"{c0} {s0}"), c0=c0, s0=s0, n0=f"{c0} {s0}")
    if cat == "counting":
        n = len(pairs)
        frames = _COUNT_ONE if n == 1 else FRAMES["counting"] + (_COUNT_TWO if n == 2 else ())
        f.update(num=NUMBER_WORDS[n], P=PLURALS[s0] if n > 1 else s0)
    else:
        frames = POSITION_FRAMES[rel] if cat == "position" else FRAMES[cat]
    if len(pairs) == 2 and cat != "counting":
        c1, s1 = pairs[1]
        f.update(c1=c1, s1=s1, n1=f"{c1} {s1}", B=_article(f"{c1} {s1}"))
    return frames[int(rng.integers(len(frames)))].format(**f)


def _candidates(pairs, n_objects: int) -> list[str]:
    """Scene template captions about the prompt's objects (module docstring)."""
    def options(c, s):
        return [(c, s)] if (c, s) not in _HELD else [p for p in _TRAIN if p[1] == s][:3]

    if n_objects == 1 or pairs[0] == pairs[-1]:
        return list(_iter_scene_captions(singles=options(*pairs[0]), pairs0=[], pairs1=[], sizes=(None,)))
    a, b = options(*pairs[0]), options(*pairs[1])
    return (list(_iter_scene_captions(singles=[], pairs0=a, pairs1=b, sizes=(None,)))
            + list(_iter_scene_captions(singles=[], pairs0=b, pairs1=a, sizes=(None,))))


_EMOJI_EMBEDDED: dict[int, tuple[list[str], object]] = {}   # id(embedder) -> (captions, embeddings)


def nearest_training_caption(prompt: str, pairs, embedder) -> tuple[str, float]:
    """The nearest training caption of a prompt by MiniLM sentence cosine, and the cosine (module docstring).
    ``embedder`` maps captions to unit sentence embeddings (:class:`~snapgen.eval.alignment.SentenceEmbedder`)."""
    if id(embedder) not in _EMOJI_EMBEDDED:
        caps = sorted(emoji_training_captions())
        _EMOJI_EMBEDDED[id(embedder)] = (caps, embedder(caps) if caps else None)
    emoji_caps, emoji_emb = _EMOJI_EMBEDDED[id(embedder)]
    cands = _candidates(pairs, len(pairs))
    q = embedder([prompt])[0]
    sims = embedder(cands) @ q
    k = int(sims.argmax())
    best, cos = cands[k], float(sims[k])
    if emoji_emb is not None:
        es = emoji_emb @ q
        j = int(es.argmax())
        if float(es[j]) > cos:
            best, cos = emoji_caps[j], float(es[j])
    return best, cos


def build_headline(seed: int = 0, per_category: int = PER_CATEGORY, heldout_per_category: int = HELDOUT_PER_CATEGORY,
                   embedder=None, max_cosine: float = MAX_COSINE) -> list[dict]:
    """The headline prompts (module docstring); ``embedder=None`` skips the similarity filter and fields."""
    from ..data.scenes import CATEGORIES

    train = shipped_training_captions()
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for cat in CATEGORIES:
        for k in range(per_category):
            heldout = k < heldout_per_category
            for _ in range(10_000):
                pairs, rel = _objects(cat, heldout, rng)
                prompt = _phrase(cat, pairs, rel, rng)
                key = normalise_caption(prompt)
                if key in seen or overlap([prompt], train):
                    continue
                near = nearest_training_caption(prompt, pairs, embedder) if embedder is not None else None
                if near is not None and near[1] > max_cosine:
                    continue
                break
            else:  # pragma: no cover
                raise RuntimeError(f"could not draw a new {cat} prompt; lower per_category")
            seen.add(key)
            meta = {"category": cat, "objects": [{"color": c, "shape": s} for c, s in pairs],
                    "relation": None if rel is None else {"subject": 0, "relation": rel, "object": 1}}
            m = metadata_from_scene(meta, prompt)
            m["source"] = "heldout_pair" if heldout else "new_phrasing"
            if near is not None:
                m["nearest_training_caption"], m["nearest_cosine"] = near[0], round(near[1], 4)
            out.append(m)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the headline SceneEval prompt set (never-seen prompts).")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "prompts" / f"{HEADLINE_SET}.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-category", type=int, default=PER_CATEGORY)
    args = ap.parse_args(argv)
    from .alignment import SentenceEmbedder

    prompts = build_headline(args.seed, args.per_category, embedder=SentenceEmbedder())
    save_prompts(prompts, args.out)
    cos = np.array([p["nearest_cosine"] for p in prompts])
    print(f"{len(prompts)} prompts -> {args.out}; nearest-training-caption cosine: max {cos.max():.3f}, "
          f"median {np.median(cos):.3f}, p90 {np.quantile(cos, 0.9):.3f}, min {cos.min():.3f}")


if __name__ == "__main__":
    main()
