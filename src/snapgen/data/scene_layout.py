"""Layout of the procedural scenes (:mod:`snapgen.data.scenes`): boxes that never overlap and relations that
are geometrically true. Vectorised rejection sampling: ``K`` candidate corners at a time, a few restarts."""

from __future__ import annotations

import numpy as np

__all__ = ["SS", "quantise", "relation_ok", "try_layout", "try_touching_layout"]

SS = 4  # supersampling factor of the renderer; boxes live on a 1/SS-pixel grid




def relation_ok(rel: str, a: np.ndarray, b: np.ndarray, sa, sb, gap: float) -> np.ndarray:
    """Vectorised check of "A rel B" for candidate top-left corners ``a``/``b`` of shape (K, 2)."""
    if rel in ("right of", "below"):
        a, b, sa, sb = b, a, sb, sa
    ax = 0 if rel in ("left of", "right of") else 1  # main axis
    separated = a[:, ax] + sa + gap <= b[:, ax]
    main = (b[:, ax] + sb / 2) - (a[:, ax] + sa / 2)
    other = np.abs((b[:, 1 - ax] + sb / 2) - (a[:, 1 - ax] + sa / 2))
    return separated & (other <= 0.5 * main)


def quantise(v: np.ndarray) -> np.ndarray:
    return np.floor(v * SS) / SS


def try_layout(rng, sides, W, H, border, gap, relation, K=64, restarts=6):
    """Top-left corners (n, 2) for boxes of the given sides, or None if no layout was found."""
    n = len(sides)
    if np.any(sides + 2 * border > min(W, H)):
        return None
    hi = np.array([[W, H]], dtype=np.float64)
    if relation is not None:
        sa, sb = sides
        for _ in range(restarts):
            a = quantise(border + rng.random((K, 2)) * (hi - 2 * border - sa))
            b = quantise(border + rng.random((K, 2)) * (hi - 2 * border - sb))
            ok = relation_ok(relation, a, b, sa, sb, gap)
            if ok.any():
                k = int(ok.argmax())
                return np.stack([a[k], b[k]])
        return None
    order = np.argsort(-sides, kind="stable")
    for _ in range(restarts):
        pos = np.zeros((n, 2))
        placed: list[int] = []
        for j in order:
            s = sides[j]
            c = quantise(border + rng.random((K, 2)) * (hi - 2 * border - s))
            ok = np.ones(K, dtype=bool)
            for p in placed:
                q, sq = pos[p], sides[p]
                ok &= ((c[:, 0] >= q[0] + sq + gap) | (c[:, 0] + s + gap <= q[0])
                       | (c[:, 1] >= q[1] + sq + gap) | (c[:, 1] + s + gap <= q[1]))
            if not ok.any():
                break
            pos[j] = c[int(ok.argmax())]
            placed.append(j)
        else:
            return pos
    return None


# ----------------------------------------------------------------------------------------------------


def try_touching_layout(rng, sides, W, H, border):
    """Top-left corners (n, 2) of boxes side by side in a row or a column, each touching the next (gap 0 on the
    main axis, a random offset of at most a quarter side across it), or None if they do not fit."""
    n = len(sides)
    horizontal = bool(rng.random() < 0.5)
    ax = 0 if horizontal else 1
    extent = (W, H)
    total = float(sides.sum())
    if total + 2 * border > extent[ax] or sides.max() * 1.5 + 2 * border > extent[1 - ax]:
        return None
    start = quantise(border + rng.random() * (extent[ax] - 2 * border - total))
    across = border + sides.max() * 0.25 + rng.random() * (extent[1 - ax] - 2 * border - sides.max() * 1.5)
    pos = np.zeros((n, 2))
    at = start
    for k in range(n):
        jitter = (rng.random() - 0.5) * 0.5 * sides[k]
        pos[k, ax] = at
        pos[k, 1 - ax] = quantise(np.array(across + (sides.max() - sides[k]) / 2 + jitter))
        at += sides[k]
    return pos
