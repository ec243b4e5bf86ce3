"""Blockwise Neighborhood Attention (BNA) geometry: the tile layout of one token grid and its index tables.

SnapGen++ Sec. 3.1 (ASSA's local branch): blocks of tokens attend to their neighbour blocks.

Geometry (chosen here; the paper leaves it open, see ``docs/architecture.md``)
-----------------------------------------------------------------------------
* The ``H x W`` token grid is cut into rectangular **tiles** of ``tile = (th, tw)`` tokens. A
  ``0`` in ``tile`` means "the whole axis": ``tile=(4, 0)`` (our default) cuts a 64x64 grid into the
  paper's 16 raster-order blocks of 4 rows; ``tile=(8, 8)`` gives 2-D tiles. A tile larger than the
  grid is clipped to it.
* Query tile ``(i, j)`` attends to the keys of the ``(2r+1) x (2r+1)`` tiles around it
  (per axis the window is ``min(2r+1, n_tiles)`` tiles wide).
* **Border rule: shift, don't shrink** (as NATTEN clamps its windows). Near the border the window
  slides inward so every query tile sees the same number of tiles: window start
  ``s_i = clamp(i - r, 0, n_tiles - window)``. Cost is then identical for every tile, shapes are
  static, and the efficient backend is a plain gather + dense SDPA.
* **Grids not divisible by the tile** are padded on the bottom/right to whole tiles. Padded keys are
  masked out and padded queries dropped, so the result is exactly the neighbourhood attention on the
  real tokens of each (partial) tile window. The padded path carries a key mask and is slower; the
  window geometry is computed on the padded tile grid.

Every backend in ``bna.py`` and ``flex.py`` reads its layout from here: :class:`TileGeometry`, the dense
mask (the reference's), and the gather tables (tile-major token order, key windows, padded keys).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TileGeometry", "make_geometry", "bna_mask"]


@dataclass(frozen=True)
class TileGeometry:
    """Static description of a BNA layout on one token grid (hashable, so index tables are cached)."""

    grid: tuple[int, int]  # (H, W) tokens
    tile: tuple[int, int]  # (th, tw) tokens, already clipped to the grid
    radius: int

    @property
    def n_tiles(self) -> tuple[int, int]:
        return (math.ceil(self.grid[0] / self.tile[0]), math.ceil(self.grid[1] / self.tile[1]))

    @property
    def window(self) -> tuple[int, int]:
        """Tiles per axis in each query tile's neighbourhood."""
        nh, nw = self.n_tiles
        return (min(2 * self.radius + 1, nh), min(2 * self.radius + 1, nw))

    @property
    def padded_grid(self) -> tuple[int, int]:
        nh, nw = self.n_tiles
        return (nh * self.tile[0], nw * self.tile[1])

    @property
    def needs_padding(self) -> bool:
        return self.padded_grid != self.grid

    @property
    def tile_tokens(self) -> int:
        return self.tile[0] * self.tile[1]

    @property
    def keys_per_query(self) -> int:
        """Keys each query attends to (including padded keys, which are masked)."""
        return self.window[0] * self.window[1] * self.tile_tokens

    @property
    def is_identity_tiling(self) -> bool:
        """True when tile-major order equals raster order (full-width row chunks, no padding)."""
        return self.tile[1] == self.grid[1] and not self.needs_padding


def make_geometry(grid: tuple[int, int], tile: tuple[int, int], radius: int) -> TileGeometry:
    """Build a :class:`TileGeometry`; ``0`` in ``tile`` means the whole axis, and tiles are clipped to the grid."""
    H, W = int(grid[0]), int(grid[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"BNA grid must be positive, got {grid}")
    if len(tile) != 2 or tile[0] < 0 or tile[1] < 0:
        raise ValueError(f"BNA tile must be two non-negative ints (0 = whole axis), got {tile}")
    if radius < 0:
        raise ValueError(f"BNA radius must be >= 0, got {radius}")
    th = H if tile[0] == 0 else min(int(tile[0]), H)
    tw = W if tile[1] == 0 else min(int(tile[1]), W)
    return TileGeometry((H, W), (th, tw), int(radius))


def _window_starts(n_tiles: int, window: int, radius: int) -> np.ndarray:
    return np.clip(np.arange(n_tiles) - radius, 0, n_tiles - window)


# Index tables depend only on the (hashable) geometry, so they are cached -- as numpy arrays, never as
# torch tensors: a tensor created while tracing (torch.export, FlopCounter on meta, torch.compile) would be
# a fake/meta tensor and poison the cache for later eager calls.

@functools.lru_cache(maxsize=64)
def _mask_np(geom: TileGeometry) -> np.ndarray:
    H, W = geom.grid
    th, tw = geom.tile
    (nh, nw), (wh, ww) = geom.n_tiles, geom.window
    tile_r = np.repeat(np.arange(H), W) // th  # raster order
    tile_c = np.tile(np.arange(W), H) // tw
    start_r = _window_starts(nh, wh, geom.radius)[tile_r]  # window start of each query's tile
    start_c = _window_starts(nw, ww, geom.radius)[tile_c]
    ok_r = (tile_r[None, :] >= start_r[:, None]) & (tile_r[None, :] < start_r[:, None] + wh)
    ok_c = (tile_c[None, :] >= start_c[:, None]) & (tile_c[None, :] < start_c[:, None] + ww)
    return ok_r & ok_c


def bna_mask(geom: TileGeometry) -> torch.Tensor:
    """``(N, N)`` boolean mask, ``True`` where query token (row) may attend to key token (column)."""
    return torch.from_numpy(_mask_np(geom))


@functools.lru_cache(maxsize=64)
def _gather_tables(geom: TileGeometry):
    """Index tables on the padded grid, as numpy arrays.

    Returns ``(query_index (tiles*T,), inverse (Np,), key_index (tiles, K), key_valid (tiles, K) or None)``.
    ``query_index`` lists padded-raster token ids in tile-major order, ``inverse`` undoes it.
    """
    Hp, Wp = geom.padded_grid
    th, tw = geom.tile
    (nh, nw), (wh, ww) = geom.n_tiles, geom.window
    # token ids of tile (i, j): (i*th + a) * Wp + (j*tw + b)
    offsets = np.arange(th)[:, None] * Wp + np.arange(tw)[None, :]  # (th, tw) inside a tile
    tile_origin = np.arange(nh)[:, None] * th * Wp + np.arange(nw)[None, :] * tw  # (nh, nw)
    tile_tokens = (tile_origin[:, :, None, None] + offsets).reshape(nh * nw, th * tw)  # (tiles, T)
    query_index = tile_tokens.reshape(-1)
    inverse = np.argsort(query_index)
    sr = _window_starts(nh, wh, geom.radius)[:, None] + np.arange(wh)[None, :]  # (nh, wh) tile rows
    sc = _window_starts(nw, ww, geom.radius)[:, None] + np.arange(ww)[None, :]  # (nw, ww) tile cols
    nb = sr[:, None, :, None] * nw + sc[None, :, None, :]  # (nh, nw, wh, ww) neighbour tile ids
    key_index = tile_tokens[nb.reshape(nh * nw, wh * ww)].reshape(nh * nw, wh * ww * th * tw)
    key_valid = None
    if geom.needs_padding:
        H, W = geom.grid
        real = np.zeros((Hp, Wp), dtype=bool)
        real[:H, :W] = True
        key_valid = real.reshape(-1)[key_index]
    return query_index, inverse, key_index, key_valid


def _tables(geom: TileGeometry, device: torch.device):
    return tuple(None if a is None else torch.from_numpy(a).to(device) for a in _gather_tables(geom))


def _pad_grid(x: torch.Tensor, geom: TileGeometry) -> torch.Tensor:
    """(B, N, h, d) on the real grid -> (B, Np, h, d) on the padded grid (zeros in the padding)."""
    if not geom.needs_padding:
        return x
    (H, W), (Hp, Wp) = geom.grid, geom.padded_grid
    B, _, h, d = x.shape
    x = x.reshape(B, H, W, h * d)
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    return x.reshape(B, Hp * Wp, h, d)


def _crop_grid(x: torch.Tensor, geom: TileGeometry) -> torch.Tensor:
    """(B, Np, h, d) on the padded grid (raster order) -> (B, N, h, d) on the real grid: drops padded tokens."""
    if not geom.needs_padding:
        return x
    (H, W), (Hp, Wp) = geom.grid, geom.padded_grid
    B, _, h, d = x.shape
    return x.reshape(B, Hp, Wp, h, d)[:, :H, :W].reshape(B, H * W, h, d)
