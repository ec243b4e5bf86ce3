"""Every caption the shipped recipe trains on, without rendering an image (issue 20 §2).

The headline SceneEval sets must be prompts the model never saw. This module gives the set of captions
``make train-shipped`` (and ``make distill``) can put in front of the model, so a test can assert zero
verbatim overlap:

* stage 1 (``configs/t2i_micro.yaml``): ``mixed`` of ``scenes`` (``split: train``) and ``emoji``
  (``split: train``, ``caption_mode: name``);
* stage 2 (``configs/t2i_micro_v2.yaml``, the 80k latent cache): ``scenes`` train + ``emoji`` train with
  ``caption_mode: random`` (any alias of an emoji);
* stage 3 (``configs/t2i_micro_elastic.yaml``) reads stage 2's cache; the distillation configs
  (``configs/distill/*``) read only that cache's captions (DMD is data-free);
* the VAE (``configs/vae_micro.yaml``) sees no caption. The alignment encoder's training captions are a
  subset of stage 1's (scenes train + emoji primary names), minus the eval prompts (see
  :mod:`snapgen.eval.alignment`).

Scene captions come from finitely many templates (``snapgen.data.scene_captions.template_caption``), so instead of
regenerating the 80k captions of one seed, :func:`scene_template_captions` enumerates **every** caption the
templates can produce for the training split (every non-held-out colour/shape pair, every number, size
word, relation phrase and background word): a superset of what any seed or length draws, hence a stronger
disjointness check. It is exact, not an approximation: a test draws 20k captions from ``SceneDataset``
and finds each in it. Emoji captions are the captions of every ``split="train"`` emoji (all aliases:
the superset of ``name`` and ``random`` mode). Everything is lowercased-and-normalised by
:func:`normalise_caption` before comparing.

About 1.8M scene captions; enumerating them takes a few seconds, cached per process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator

from ..data.scene_captions import _PATTERN_WORDS, _REL_PHRASES, _article, diverse_caption_pattern, normalise_caption
from ..data.scenes import COLORS, HELDOUT_PAIRS, NUMBER_WORDS, PLURALS, SHAPES, SIZES

__all__ = ["SHIPPED_CAPTION_STYLES", "SHIPPED_CONFIGS", "emoji_training_captions", "normalise_caption", "overlap",
           "scene_caption_pattern", "scene_template_captions", "shipped_training_captions"]

# The caption styles (SceneDataset's ``captions``) the shipped configs' scene sources use; a test fails if a
# shipped config uses another (then add it here, and `overlap` checks it).
SHIPPED_CAPTION_STYLES = ("templates",)
# The configs of `make train-shipped` + `make distill` whose data carries captions.
SHIPPED_CONFIGS = ("configs/t2i_micro.yaml", "configs/t2i_micro_v2.yaml", "configs/t2i_micro_elastic.yaml",
                   "configs/distill/fewstep_teacher.yaml", "configs/distill/kdmd.yaml",
                   "configs/distill/kdmd_cosine.yaml")

def _train_pairs() -> list[tuple[str, str]]:
    held = set(HELDOUT_PAIRS)
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]


def _bgs() -> list[str]:
    return [f"on a {w} background" for w in _PATTERN_WORDS.values()]


def _iter_scene_captions(singles=None, pairs0=None, pairs1=None, sizes=(None, *SIZES)) -> Iterator[str]:
    """Every caption ``_caption`` can return for a training-split scene (mirrors its templates). ``singles``
    (one-object categories) and ``pairs0`` / ``pairs1`` (first / second object of two-object categories)
    default to every training (colour, shape) pair; restricting them gives the template captions about
    given objects (the nearest-neighbour candidates of :mod:`snapgen.eval.headline`)."""
    pairs = _train_pairs()
    singles = pairs if singles is None else singles
    pairs0 = pairs if pairs0 is None else pairs0
    pairs1 = pairs if pairs1 is None else pairs1
    bgs = _bgs()

    def noun(c, s, z):
        return " ".join(([z] if z else []) + [c, s])

    # counting (never sized)
    for c, s in singles:
        for n, num in NUMBER_WORDS.items():
            what = f"{num} {c} {PLURALS[s] if n > 1 else s}"
            be = "are" if n > 1 else "is"
            yield from (what, f"a photo of {what}", f"exactly {what}", f"there {be} {what}", f"an image of {what}")
            yield from (f"{what} {bg}" for bg in bgs)
    # single_object and colors
    for c, s in singles:
        for z in sizes:
            a = _article(noun(c, s, z))
            yield from (a, f"a photo of {a}", f"an image of {a}", f"a picture of {a}")
            yield from (f"one {noun(c, s, z)} {bg}" for bg in bgs)
            yield from (f"{a} {bg}" for bg in bgs)
            sz = _article((z + " " if z else "") + s)
            yield from (f"{sz} that is {c}", f"{sz} colored {c}", f"{sz} in {c}")
    # two-object categories: distinct shapes; one `sized` flag for both objects, sizes independent
    rel_phrases = [p for ps in _REL_PHRASES.values() for p in ps]
    for c0, s0 in pairs0:
        for c1, s1 in pairs1:
            if s0 == s1:
                continue
            for z0 in sizes:
                for z1 in sizes:
                    if (z0 is None) != (z1 is None):
                        continue
                    a, b = _article(noun(c0, s0, z0)), _article(noun(c1, s1, z1))
                    # two_object (+ the colour-binding templates shared with color_attr)
                    yield from (f"{a} and {b}", f"a photo of {a} and {b}", f"an image with {a} and {b}",
                                f"two shapes: {a} and {b}", f"{a} together with {b}")
                    yield from (f"{a} and {b} {bg}" for bg in bgs)
                    if c0 != c1:
                        q0 = _article((z0 + " " if z0 else "") + s0)
                        q1 = _article((z1 + " " if z1 else "") + s1)
                        yield f"{q0} that is {c0} and {q1} that is {c1}"
                    for rel in rel_phrases:
                        yield from (f"{a} {rel} {b}", f"a photo of {a} {rel} {b}", f"{a} is {rel} {b}",
                                    f"{a} placed {rel} {b}")
                        yield from (f"{a} {rel} {b} {bg}" for bg in bgs)


@functools.lru_cache(maxsize=1)
def scene_template_captions() -> frozenset[str]:
    """Normalised forms of every training-split scene caption the templates can produce (module docstring)."""
    return frozenset(normalise_caption(c) for c in _iter_scene_captions())


@functools.lru_cache(maxsize=1)
def emoji_training_captions() -> frozenset[str]:
    """Normalised forms of every caption (primary name and aliases) of the ``split="train"`` emoji; empty
    when the emoji extra is not installed (then the shipped recipe could not have trained on emoji either)."""
    try:
        from ..data.emoji import is_test_split, list_openmoji
        entries = list_openmoji()
    except Exception:  # noqa: BLE001 - the optional extra is missing
        return frozenset()
    return frozenset(normalise_caption(c) for e in entries if not is_test_split(e.codepoints) for c in e.captions)


def shipped_training_captions() -> frozenset[str]:
    """Normalised forms of every caption the shipped recipe (:data:`SHIPPED_CONFIGS`) can train on."""
    return scene_template_captions() | emoji_training_captions()


def scene_caption_pattern():
    """The regex of every ``captions: diverse`` scene caption about any object (normalised form; a superset of
    what any seed draws: :func:`snapgen.data.scene_captions.diverse_caption_pattern`)."""
    return diverse_caption_pattern(tuple(COLORS))


def overlap(prompts: Iterable[str], captions: frozenset[str] | None = None,
            styles: Iterable[str] = SHIPPED_CAPTION_STYLES) -> list[str]:
    """The prompts whose normalised form is a training caption: in ``captions`` (``shipped_training_captions()``
    by default: the template and emoji captions) or, when ``"diverse"`` is among ``styles``, matched by
    :func:`scene_caption_pattern`."""
    captions = shipped_training_captions() if captions is None else captions
    pattern = scene_caption_pattern() if "diverse" in set(styles) else None
    out = []
    for p in prompts:
        key = normalise_caption(p)
        if key in captions or (pattern is not None and pattern.fullmatch(key)):
            out.append(p)
    return out
