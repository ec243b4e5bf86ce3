"""The one image-resolution parser: an int, an ``(H, W)`` pair or a ``"N"`` / ``"HxW"`` string -> ``(H, W)``.

Callers keep their own error messages (the CLI, ``snapgen info`` and the datasets word them differently) by
passing ``error`` / ``too_small`` templates; ``{!r}`` in a template is replaced by the value given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["parse_resolution", "PAIR_ERROR"]

PAIR_ERROR = "resolution must be an int or an (H, W) pair of ints, got {!r}"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _parse(value) -> tuple[int, int] | None:
    if _is_int(value):
        return int(value), int(value)
    if isinstance(value, str):  # "1024", "768x1344", "768 x 1344", "768X1344"
        try:
            parts = [int(p) for p in value.lower().replace(" ", "").split("x")]
        except ValueError:
            return None
        if len(parts) == 1:
            parts *= 2
        return (parts[0], parts[1]) if len(parts) == 2 else None
    if isinstance(value, Sequence) and len(value) == 2 and all(map(_is_int, value)):
        return int(value[0]), int(value[1])
    return None


def parse_resolution(value, *, minimum: int = 1, error: str = PAIR_ERROR,
                     too_small: str | None = None) -> tuple[int, int]:
    """``(height, width)`` in pixels from ``value``.

    Accepted: an int ``N`` (Python or numpy, not bool) -> ``(N, N)``; a length-2 sequence of ints ``(H, W)``;
    a string ``"N"`` or ``"HxW"`` (case-insensitive, spaces ignored, e.g. ``"768x1344"``).

    Raises:
        ValueError: ``error.format(value)`` for anything else; ``too_small.format(value)`` (default: the
            ``error`` message) when a side is below ``minimum``.
    """
    hw = _parse(value)
    if hw is None:
        raise ValueError(error.format(value))
    if min(hw) < minimum:
        raise ValueError((error if too_small is None else too_small).format(value))
    return hw
