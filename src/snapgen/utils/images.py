"""Contact sheets: images in a grid with their captions (training samples, README figures)."""

from __future__ import annotations

from PIL import Image

__all__ = ["make_grid"]


def make_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int | None = None,
              scale: int = 1, caption_height: int = 28) -> Image.Image:
    """Images in a grid, each with its caption written under it (wrapped)."""
    from PIL import ImageDraw, ImageFont

    n = len(images)
    cols = cols or min(n, 4)
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    w, h = w * scale, h * scale
    ch = caption_height if captions else 0
    cell_w = max(w, 96)
    grid = Image.new("RGB", (cols * cell_w, rows * (h + ch)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + (cell_w - w) // 2, r * (h + ch)
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (x0, y0))
        if captions:
            text = _wrap(captions[i], max_chars=max(8, cell_w // 6))
            draw.multiline_text((c * cell_w + 2, y0 + h + 1), text, fill="black", font=font, spacing=1)
    return grid


def _wrap(text: str, max_chars: int) -> str:
    import textwrap

    lines = textwrap.wrap(text, max_chars)[:3]
    return "\n".join(lines)
