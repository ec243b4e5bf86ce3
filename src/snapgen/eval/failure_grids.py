"""Failure grids of a SceneEval run (``report folder/failures/failures_<category>.png``): the failed images of each
category with their detections drawn and the verdict's reason, for a person to look at."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.scenes import CATEGORIES

__all__ = ["write_failure_grids"]


def _annotate(image: Image.Image, dets: Sequence[Mapping], side: int) -> Image.Image:
    """``image`` scaled to ``side`` px (nearest) with each detection's box and label drawn on it."""
    w, h = image.size
    s = side / max(w, h)
    im = image.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=10)
    for d in dets:
        x0, y0, x1, y1 = (v * s for v in d["box"])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 255), width=1)
        label = f"{d['color']} {d['shape']} {d['confidence']:.2f}"
        draw.text((x0 + 1, max(0, y0 - 11)), label, fill=(255, 0, 255), font=font)
    return im


def write_failure_grids(results: Sequence[Mapping], images: Sequence[Image.Image], out_dir: str | os.PathLike,
                        per_category: int = 8, cell: int = 192, cols: int = 4) -> dict[str, Path]:
    """One PNG per tag with failures, ``failures_<tag>.png``: up to ``per_category`` failed images with
    their detections drawn (box + "colour shape confidence"), the prompt and the reason under each.
    ``images[r["index"]]`` is the image of result ``r``. Returns ``{tag: path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=10)
    chars = max(10, cell // 6)
    written = {}
    tags = [t for t in CATEGORIES if any(r["tag"] == t for r in results)]
    tags += sorted({r["tag"] for r in results} - set(tags))
    for tag in tags:
        fails = [r for r in results if r["tag"] == tag and not r["correct"]][:per_category]
        if not fails:
            continue
        texts = []
        for r in fails:
            lines = textwrap.wrap(r["prompt"], chars)
            for part in (r["reason"] or "incorrect").split("\n"):
                lines += textwrap.wrap("x " + part, chars)
            texts.append(lines[:8])
        text_h = 4 + 12 * max(len(t) for t in texts)
        ncols = min(cols, len(fails))
        nrows = -(-len(fails) // ncols)
        grid = Image.new("RGB", (ncols * (cell + 4), nrows * (cell + text_h) + 16), "white")
        draw = ImageDraw.Draw(grid)
        draw.text((2, 2), f"{tag}: {len(fails)} of {sum(1 for r in results if r['tag'] == tag and not r['correct'])} "
                          f"failures shown", fill="black", font=font)
        for k, (r, lines) in enumerate(zip(fails, texts)):
            row, col = divmod(k, ncols)
            x, y = col * (cell + 4) + 2, 16 + row * (cell + text_h)
            grid.paste(_annotate(images[r["index"]], r["detections"], cell), (x, y))
            draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=2)
        path = out_dir / f"failures_{tag}.png"
        grid.save(path)
        written[tag] = path
    return written
