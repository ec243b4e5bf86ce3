"""Your own captioned images: a folder of pictures with caption files.

Captions come from ``captions.jsonl`` in the root (one ``{"file": "relative/path.png", "caption": "..."}``
per line) or, for files it does not list, from a sidecar text file (``cat.png`` + ``cat.txt``). When
both give a caption the jsonl one wins. Images without a caption (missing or blank) are skipped and
counted in ``skipped_uncaptioned``.

Unreadable images never crash a run: files that fail ``PIL.Image.verify()`` at scan time are skipped
with a single counted warning, and a file that still fails to decode when loaded is skipped then (the
next valid index is returned instead) and counted in ``skipped_unreadable``.

Each image is EXIF-rotated, composited on white when it has transparency, converted to RGB, then
centre-cropped and resized to ``resolution`` with :func:`center_crop_resize`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..utils.resolution import parse_resolution
from .base import Sample, center_crop_resize

__all__ = ["CAPTIONS_FILE", "IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _read_jsonl(path: Path) -> dict[str, str]:
    """``captions.jsonl`` -> {posix relative path: caption}. Malformed lines raise ``ValueError``."""
    captions: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file, caption = row["file"], row["caption"]
                if not isinstance(file, str) or not isinstance(caption, str):
                    raise TypeError("'file' and 'caption' must be strings")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with string 'file' and 'caption' "
                                 f"fields ({type(err).__name__}: {err})") from None
            captions[Path(file).as_posix().removeprefix("./")] = caption
    return captions


class ImageFolderDataset(Dataset):
    """Captioned images from a folder; items are :class:`Sample` with ``meta = {"path", "source"}``.

    Args:
        root: the folder.
        resolution: output size, an int or ``(H, W)``; ``None`` keeps each image's own size (e.g. to pack
            shards whose images are put into aspect buckets at encode time).
        recursive: also look in sub-folders.

    Attributes:
        paths, captions: the usable images (sorted by path) and their captions.
        skipped_uncaptioned: images found without any caption.
        skipped_unreadable: images that failed to open (at scan time, plus any found at load time).
    """

    def __init__(self, root: str | os.PathLike, resolution: int | Sequence[int] | None = 64, recursive: bool = True):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}"
                                    if not self.root.exists() else f"not a folder: {self.root}")
        if resolution is None:
            self.size: int | tuple[int, int] | None = None
        else:
            hw = parse_resolution(resolution,
                                  error="resolution must be a positive int, an (H, W) pair or None, got {!r}")
            self.size = hw if isinstance(resolution, (str, Sequence)) else hw[0]  # an int stays an int
        self.resolution = resolution
        self.recursive = recursive

        jsonl = self.root / CAPTIONS_FILE
        jsonl_captions = _read_jsonl(jsonl) if jsonl.is_file() else {}
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in self.root.glob(pattern)
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.skipped_uncaptioned = 0
        self.skipped_unreadable = 0
        first_bad: tuple[Path, BaseException] | None = None
        for p in files:
            caption = jsonl_captions.get(p.relative_to(self.root).as_posix())
            if caption is None or not caption.strip():
                sidecar = p.with_suffix(".txt")
                caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None
            if caption is None or not caption.strip():
                self.skipped_uncaptioned += 1
                continue
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as err:  # noqa: BLE001 -- PIL raises many types for bad files
                self.skipped_unreadable += 1
                first_bad = first_bad or (p, err)
                continue
            self.paths.append(p)
            self.captions.append(" ".join(caption.split()))

        if first_bad is not None:
            path, err = first_bad
            warnings.warn(f"skipped {self.skipped_unreadable} unreadable images in {self.root}: "
                          f"first: {path}: {err}", RuntimeWarning, stacklevel=2)
        if self.skipped_uncaptioned:
            warnings.warn(f"skipped {self.skipped_uncaptioned} images without a caption in {self.root} "
                          f"(no entry in {CAPTIONS_FILE} and no sidecar .txt)", RuntimeWarning, stacklevel=2)
        if not self.paths:
            raise ValueError(
                f"no usable captioned images in {self.root} (recursive={recursive}): looked for files "
                f"ending {', '.join(IMAGE_EXTENSIONS)} with a caption in {self.root / CAPTIONS_FILE} "
                f"({{\"file\": ..., \"caption\": ...}} per line) or a sidecar <name>.txt; found "
                f"{len(files)} image files, {self.skipped_uncaptioned} without a caption, "
                f"{self.skipped_unreadable} unreadable")
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as im:
            return _to_rgb(im).copy() if self.size is None else center_crop_resize(_to_rgb(im), self.size)

    def __getitem__(self, index: int) -> Sample:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for ImageFolderDataset of length {n}")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                image = self._load(i)
            except Exception as err:  # noqa: BLE001 -- decode errors only show up on full load
                self._bad.add(i)
                self.skipped_unreadable += 1
                warnings.warn(f"skipped unreadable image {self.paths[i]}: {err} "
                              f"({len(self._bad)} failed at load time so far)", RuntimeWarning, stacklevel=2)
                continue
            return Sample(image, self.captions[i], {"path": str(self.paths[i]), "source": "folder"})
        raise RuntimeError(f"every image in {self.root} failed to load ({len(self._bad)} unreadable)")

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root='{self.root}', resolution={self.resolution!r}, n={len(self)})"
