"""Captions of the procedural scenes (:mod:`snapgen.data.scenes`): two styles.

* ``"templates"`` (:func:`template_caption`): round one's few templates per category ("a red star", "a photo of
  a red star and a blue circle", "three green hearts", ...). The shipped model of round one trained on them;
  they are kept draw-for-draw (same random numbers consumed), so its recipe and latent caches reproduce.
* ``"diverse"`` (:func:`diverse_caption`, issue 21 §2): a small grammar with many phrasings per scene, drawn at
  random per sample: sentence wrappers ("a photo of ...", "a render of ..."), colour before or after the shape
  ("a star in red", "a star that is red"), shape and colour synonyms ("disc", "five-pointed star", "grey"),
  size words and their synonyms, counts as words and digits ("three" / "3"), both orders of two objects, and
  relations said from either side ("A left of B" = "B right of A"), with several relation words each.

The grammar is a set of tables (:data:`WRAPPERS`, :data:`PHRASES`, :data:`SENTENCES`, the word tables);
sampling, the exact per-scene enumeration (:func:`diverse_captions`, for tests) and the regular expression of
everything the grammar can say about any object (:func:`diverse_caption_pattern`, for the evaluation's
disjointness check) are all read from the same tables, so they cannot drift apart.

The headline evaluation prompts (:mod:`snapgen.eval.headline`) must stay unseen: the grammar avoids their
sentence frames on purpose ("next to", "beside", "beneath", "painted", "coloured", "a drawing showing", ...),
and ``tests/test_scene_captions.py`` asserts that no headline prompt matches :func:`diverse_caption_pattern`.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["CAPTION_STYLES", "PHRASES", "SENTENCES", "WRAPPERS", "describe", "diverse_caption",
           "diverse_caption_pattern", "diverse_captions", "frames", "normalise_caption", "template_caption"]

CAPTION_STYLES = ("templates", "diverse")

# -- shared words (the scene world's vocabulary; scenes.py re-exports the public ones) ---------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "hexagon")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
_PATTERN_WORDS = {None: "plain", "stripes": "striped", "checks": "checkered", "noise": "speckled"}
_REL_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below",),
}
_SIZE_MENTION_P = 0.3


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ================================================================================================================
# Style "templates" (round one; moved here unchanged from scenes.py).


def _noun(obj: dict, with_size: bool) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
    return " ".join(words)


def _bg_phrase(background: dict) -> str:
    return f"on a {_PATTERN_WORDS[background['pattern']]} background"


def template_caption(meta: dict, rng: np.random.Generator | None) -> str:
    """The round-one caption for a scene; ``rng=None`` gives the canonical (first-template, no size) caption."""

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    cat, objs, bg = meta["category"], meta["objects"], _bg_phrase(meta["background"])
    sized = rng is not None and cat != "counting" and rng.random() < _SIZE_MENTION_P
    if cat == "counting":
        n, o = len(objs), objs[0]
        num, noun = NUMBER_WORDS[n], PLURALS[o["shape"]] if n > 1 else o["shape"]
        what = f"{num} {o['color']} {noun}"
        be = "are" if n > 1 else "is"
        return pick((what, f"a photo of {what}", f"exactly {what}", f"{what} {bg}",
                     f"there {be} {what}", f"an image of {what}"))
    a = _article(_noun(objs[0], sized))
    if cat in ("single_object", "colors"):
        o = objs[0]
        if cat == "single_object":
            return pick((a, f"a photo of {a}", f"one {_noun(o, sized)} {bg}", f"an image of {a}",
                         f"{a} {bg}", f"a picture of {a}"))
        s = (o["size"] + " " if sized else "") + o["shape"]
        return pick((a, f"{_article(s)} that is {o['color']}", f"{_article(s)} colored {o['color']}",
                     f"a photo of {a}", f"{_article(s)} in {o['color']}", f"{a} {bg}"))
    b = _article(_noun(objs[1], sized))
    if cat == "position":
        rel = pick(_REL_PHRASES[meta["relation"]["relation"]])
        return pick((f"{a} {rel} {b}", f"a photo of {a} {rel} {b}", f"{a} is {rel} {b}",
                     f"{a} placed {rel} {b}", f"{a} {rel} {b} {bg}"))
    if cat == "two_object":
        return pick((f"{a} and {b}", f"a photo of {a} and {b}", f"{a} and {b} {bg}",
                     f"an image with {a} and {b}", f"two shapes: {a} and {b}"))
    # color_attr
    o0, o1 = objs
    s0 = _article((o0["size"] + " " if sized else "") + o0["shape"])
    s1 = _article((o1["size"] + " " if sized else "") + o1["shape"])
    return pick((f"{a} and {b}", f"a photo of {a} and {b}",
                 f"{s0} that is {o0['color']} and {s1} that is {o1['color']}",
                 f"{a} together with {b}", f"{a} and {b} {bg}"))


def describe(meta: dict[str, Any]) -> str:
    """The canonical caption of a scene (first template, no size words), e.g. for evaluation prompts."""
    return template_caption(meta, None)


# ================================================================================================================
# Style "diverse" (issue 21 §2): the tables.

SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {   # (singular, plural); the first is the shape's name
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("square shape", "square shapes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "star": (("star", "stars"), ("star shape", "star shapes"), ("five-pointed star", "five-pointed stars")),
    "heart": (("heart", "hearts"), ("heart shape", "heart shapes"), ("love heart", "love hearts")),
    "hexagon": (("hexagon", "hexagons"), ("hexagonal shape", "hexagonal shapes"), ("six-sided shape",
                                                                                   "six-sided shapes")),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}   # others: the colour's name only
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "medium": ("medium", "medium-sized"),
                                          "large": ("large", "big")}
COUNT_WORDS: dict[int, tuple[str, ...]] = {n: (w, str(n)) for n, w in NUMBER_WORDS.items()}
REL_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of", "at the left of"),
    "right of": ("to the right of", "right of", "on the right of", "at the right of"),
    "above": ("above", "up above", "over"),
    "below": ("below", "down below", "under"),
}
INVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BG_FRAMES = ("on a {p} background", "against a {p} background", "with a {p} background")

# Sentence wrappers around the scene's content {X}; "{bg}" is a background phrase (true to the image). Noun
# phrases take every wrapper ("{X}" three times: a third of captions are bare); full sentences ("there is ...",
# "... is left of ...") take only SENTENCE_WRAPPERS.
WRAPPERS: tuple[str, ...] = (
    "{X}", "{X}", "{X}", "a photo of {X}", "an image of {X}", "a picture of {X}", "a render of {X}",
    "a photograph of {X}", "{X} {bg}", "a photo of {X} {bg}", "an image of {X} {bg}",
)
SENTENCE_WRAPPERS: tuple[str, ...] = ("{X}", "{X} {bg}")
# Content per category. Slots: {A} {B} noun phrase with article ("a small red star"); {N} the same without
# article; {As} {Bs} article + size + shape word (the colour said elsewhere); {c} {c0} {c1} colour words; {s}
# shape word; {P} plural shape word; {num} count; {rel} relation words. In two-object frames A / B are the
# objects in either order; in position frames A is the subject of {rel} (either object, the words follow).
PHRASES: dict[str, tuple[str, ...]] = {
    "single_object": ("{A}", "one {N}", "{As} in {c}", "{As} that is {c}", "{As} colored {c}", "{A} on its own"),
    "colors": ("{A}", "{As} in {c}", "{As} that is {c}", "{As} colored {c}", "{As} with the color {c}",
               "{As} in the color {c}"),
    "counting": ("{num} {c} {P}", "exactly {num} {c} {P}", "{num} {P} that are {c}", "{num} {P} in {c}",
                 "{num} {c} {P} in total", "{num} {P}, each one {c}"),
    "counting_one": ("{num} {c} {s}", "exactly {num} {c} {s}", "{num} {s} in {c}", "{num} {s} that is {c}"),
    "two_object": ("{A} and {B}", "{A} with {B}", "two shapes: {A} and {B}", "two objects, {A} and {B}",
                   "{A} and {B} together", "{A} and {B} in one picture"),
    "color_attr": ("{A} and {B}", "{A} with {B}", "two shapes: {A} and {B}", "{A} and {B} together",
                   "{As} that is {c0} and {Bs} that is {c1}", "{As} that is {c0} with {Bs} that is {c1}",
                   "{A} together with {B}"),
    "position": ("{A} {rel} {B}", "{A} placed {rel} {B}", "{A} positioned {rel} {B}", "{A} located {rel} {B}",
                 "{A}, {rel} {B}"),
}
SENTENCES: dict[str, tuple[str, ...]] = {
    "single_object": ("there is {A}",),
    "colors": ("there is {As} in {c}",),
    "counting": ("there are {num} {c} {P}",),
    "counting_one": ("there is {num} {c} {s}",),
    "two_object": ("there is {A} and {B}",),
    "color_attr": ("there is {A} and {B}",),
    "position": ("{A} is {rel} {B}",),
}


def frames(key: str) -> list[str]:
    """Every (wrapper x content) frame of a content key, with the wrappers' repetitions (the sampling weights)."""
    return ([w.replace("{X}", c) for w in WRAPPERS for c in PHRASES[key]]
            + [w.replace("{X}", c) for w in SENTENCE_WRAPPERS for c in SENTENCES[key]])


_SLOT = re.compile(r"\{(\w+)\}")


# -- per-scene options of every slot ------------------------------------------------------------------------------

def _color_words(c: str) -> tuple[str, ...]:
    return COLOR_WORDS.get(c, (c,))


def _np(obj: dict, sized: bool, article: bool, with_color: bool = True) -> list[str]:
    sizes = SIZE_WORDS[obj["size"]] if sized else ("",)
    colors = _color_words(obj["color"]) if with_color else ("",)
    out = []
    for z, c, (w, _) in itertools.product(sizes, colors, SHAPE_WORDS[obj["shape"]]):
        phrase = " ".join(x for x in (z, c, w) if x)
        out.append(_article(phrase) if article else phrase)
    return out


def _bgs(background: dict) -> list[str]:
    return [f.format(p=_PATTERN_WORDS[background["pattern"]]) for f in BG_FRAMES]


def _structure(meta: dict, order: tuple[int, ...], sized: bool) -> tuple[str, tuple[int, ...], str | None, bool]:
    """(content key, object order, relation said, sized) for one choice of order and size flag."""
    cat, n = meta["category"], len(meta["objects"])
    if cat == "counting":
        return ("counting_one" if n == 1 else "counting", (0,), None, False)
    rel = None
    if cat == "position":
        rel = meta["relation"]["relation"] if order == (0, 1) else INVERSE[meta["relation"]["relation"]]
    return (cat, order, rel, sized)


def _orders(meta: dict) -> list[tuple[int, ...]]:
    return [(0,)] if meta["category"] == "counting" or len(meta["objects"]) == 1 else [(0, 1), (1, 0)]


def _slot_options(meta: dict, order: tuple[int, ...], rel: str | None, sized: bool) -> dict[str, list[str]]:
    objs = [meta["objects"][k] for k in order]
    o = objs[0]
    opts = {"A": _np(o, sized, True), "N": _np(o, sized, False), "As": _np(o, sized, True, with_color=False),
            "c": list(_color_words(o["color"])), "c0": list(_color_words(o["color"])),
            "s": [w for w, _ in SHAPE_WORDS[o["shape"]]], "P": [p for _, p in SHAPE_WORDS[o["shape"]]],
            "num": list(COUNT_WORDS[len(meta["objects"])]), "bg": _bgs(meta["background"])}
    if len(objs) == 2:
        b = objs[1]
        opts.update(B=_np(b, sized, True), Bs=_np(b, sized, True, with_color=False),
                    c1=list(_color_words(b["color"])))
    if rel is not None:
        opts["rel"] = list(REL_WORDS[rel])
    return opts


def _fill(frame: str, values: dict[str, str]) -> str:
    return _SLOT.sub(lambda m: values[m.group(1)], frame)


# -- sampling, enumeration ----------------------------------------------------------------------------------------

def diverse_caption(meta: dict, rng: np.random.Generator) -> str:
    """One caption of the grammar for a scene: the objects' order (two objects), whether sizes are said (p 0.3,
    never for counting), the frame, then every slot's words, each uniform."""
    orders = _orders(meta)
    order = orders[int(rng.integers(len(orders)))] if len(orders) > 1 else orders[0]
    sized = meta["category"] != "counting" and bool(rng.random() < _SIZE_MENTION_P)
    key, order, rel, sized = _structure(meta, order, sized)
    opts = _slot_options(meta, order, rel, sized)
    fs = frames(key)
    frame = fs[int(rng.integers(len(fs)))]
    values = {name: opts[name][int(rng.integers(len(opts[name])))] for name in dict.fromkeys(_SLOT.findall(frame))}
    return _fill(frame, values)


def diverse_captions(meta: dict) -> Iterator[str]:
    """Every caption :func:`diverse_caption` can return for this scene (each once)."""
    seen = set()
    sizes = (False,) if meta["category"] == "counting" else (False, True)
    for order, sized in itertools.product(_orders(meta), sizes):
        key, order, rel, sized = _structure(meta, order, sized)
        opts = _slot_options(meta, order, rel, sized)
        for frame in dict.fromkeys(frames(key)):
            names = list(dict.fromkeys(_SLOT.findall(frame)))
            for combo in itertools.product(*(opts[n] for n in names)):
                text = _fill(frame, dict(zip(names, combo)))
                if text not in seen:
                    seen.add(text)
                    yield text


# -- the regular expression of the whole grammar ------------------------------------------------------------------

def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


@functools.lru_cache(maxsize=4)
def diverse_caption_pattern(colors: tuple[str, ...]) -> re.Pattern:
    """A regex that fully matches the :func:`normalise_caption` form of every caption the grammar can produce
    for any scene of objects with these colour names (any shape, size, count, relation and background): a
    superset of the training captions (held-out pairs included), hence a stronger disjointness check."""
    color = _alt(w for c in colors for w in _color_words(c))
    shape = _alt(w for ws in SHAPE_WORDS.values() for w, _ in ws)
    size = "(?:" + _alt(w for ws in SIZE_WORDS.values() for w in ws) + " )?"
    slot_re = {
        "a": f"{size}{color} {shape}", "b": f"{size}{color} {shape}", "n": f"{size}{color} {shape}",
        "as": f"{size}{shape}", "bs": f"{size}{shape}", "c": color, "c0": color, "c1": color, "s": shape,
        "p": _alt(p for ws in SHAPE_WORDS.values() for _, p in ws),
        "num": _alt(w for ws in COUNT_WORDS.values() for w in ws),
        "rel": _alt(normalise_caption(w) for ws in REL_WORDS.values() for w in ws),
        "bg": _alt(normalise_caption(f.format(p=p)) for f in BG_FRAMES for p in _PATTERN_WORDS.values()),
    }
    alternatives = []
    for key in PHRASES:
        for frame in dict.fromkeys(frames(key)):
            marked = normalise_caption(_SLOT.sub(lambda m: f" zzz{m.group(1)}zzz ", frame))
            parts = re.split(r"(zzz\w+?zzz)", marked)
            alternatives.append("".join(slot_re[p[3:-3]] if p.startswith("zzz") else re.escape(p) for p in parts))
    return re.compile("(?:" + "|".join(f"(?:{f})" for f in alternatives) + ")")


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s-]")


def normalise_caption(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace: captions that differ only
    in those count as the same caption ("A red circle." == "red circle")."""
    t = _PUNCT.sub(" ", text.casefold())
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())
