"""Blockwise Neighborhood Attention (BNA): the local branch of ASSA.

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

Backends (all heads-last: ``q (B, N, Hq, d)``, ``k, v (B, N, Hkv, d)``, ``Hq % Hkv == 0``)
------------------------------------------------------------------------------------------
* ``"reference"``: dense SDPA with an explicit ``(N, N)`` boolean mask. Obviously correct, O(N^2).
* ``"gather"``: gather each query tile and its neighbour tiles, fold tiles into the batch and run
  one dense SDPA of shape ``(B * tiles, heads, T, window * T)``. No data-dependent control flow:
  the indices depend on shapes only, so it exports (ONNX, ExecuTorch, Core ML). Default. For row
  chunks the key windows are an overlapping strided view of k/v (no window copy; q/k/v are copied once to
  heads-first, which the CPU flash kernel runs faster).
* ``"tiles"``: ``gather`` without the strided-view shortcut: always index gathers + one batched SDPA
  (the paper's on-device form, "blockwise attention as a batch of small dense attentions"); used by the
  Core ML / ExecuTorch exports.
* ``"flex"``: ``torch.nn.attention.flex_attention`` on tile-major tokens with a cached block mask.
  Inference only on CPU (flex has no CPU backward); compiled when ``compile=True``.
* ``"fused"``: snapgen's own CPU kernel for row chunks (``cpu_kernel.py``, ``csrc/bna_rows_cpu.cpp``): one
  exact-softmax block per (chunk, head), dK/dV accumulated straight into the key/value gradient. fp32 CPU,
  row-chunk geometries only; compiled with g++ on first use.
* ``"auto"`` (the model default): ``fused`` where it applies and is faster -- CPU, fp32, row chunks of fewer
  than 768 tokens (from 768 query rows PyTorch's flash kernel switches to 256-row blocks and matches it),
  not while tracing/exporting/compiling, kernel built -- otherwise ``gather`` (decided in ``backend.py``, which
  logs each choice once with its reason; :func:`snapgen.attention.backend_report`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backend import FUSED_MAX_TILE_TOKENS, check_fused_inputs, use_fused_kernel
from .cpu_kernel import bna_rows

__all__ = ["TileGeometry", "make_geometry", "bna_mask", "block_neighborhood_attention", "bna_lerp_into",
           "BNA_BACKENDS", "FUSED_MAX_TILE_TOKENS", "check_fused_inputs", "use_fused_kernel"]

BNA_BACKENDS = ("auto", "gather", "fused", "tiles", "reference", "flex")


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


# ----------------------------------------------------------------------------------------------
# Reference: dense SDPA with an explicit boolean mask
# ----------------------------------------------------------------------------------------------

def bna_mask(geom: TileGeometry) -> torch.Tensor:
    """``(N, N)`` boolean mask, ``True`` where query token (row) may attend to key token (column)."""
    return torch.from_numpy(_mask_np(geom))


def _bna_reference(q, k, v, geom: TileGeometry) -> torch.Tensor:
    mask = bna_mask(geom).to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Gather backend: tiles folded into the batch, one dense SDPA
# ----------------------------------------------------------------------------------------------

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


def _row_chunk_parts(q, k, v, geom: TileGeometry):
    """Row chunks (tiles spanning the full width, no padding): raster order is already tile-major and a
    window of consecutive chunks is a contiguous token range, so the distinct key windows are one
    overlapping strided view of k and v -- no K/V window copy. Chunks whose window is clamped at the
    top/bottom border share the first/last window and are run as two small extra groups.

    q, k and v are first copied once to heads-first ``(B, heads, N, d)``: every (chunk, head) block is then
    a dense matrix with unit row stride, which the CPU flash-attention kernel runs markedly faster on these
    small problems than on heads-last strides (measured on the local branch alone, net of the copies:
    -7% forward at 4096 tokens, -20% at 1024 and 16384, in one-off A/B runs; ``docs/performance.md``).

    Yields ``(b, first_chunk, out)`` in chunk order with ``out (chunks, Hq, T, d)`` (heads-first)."""
    B, N, Hq, d = q.shape
    n, wn, r = geom.n_tiles[0], geom.window[0], geom.radius
    T = geom.tile_tokens
    span = wn * T
    n_windows = n - wn + 1
    lo, hi = min(r, n), min(r + n_windows, n)  # chunks [lo, hi) use window (i - r): the regular ones
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, heads, N, d)
    # split/unbind rather than slicing: their backward is one cat/stack, slicing's is a zero-fill per slice
    sizes = [lo, hi - lo, n - hi]
    q_groups = [g.unbind(0) for g in q.reshape(B, Hq, n, T, d).transpose(1, 2).split(sizes, dim=1)]
    for b, (kb, vb) in enumerate(zip(k.unbind(0), v.unbind(0))):  # per image the windows are a view
        # unfold (not as_strided): the same overlapping view, with a fast dedicated backward
        win_k = kb.unfold(1, span, T).permute(1, 0, 3, 2)  # (n_windows, Hk, span, d)
        win_v = vb.unfold(1, span, T).permute(1, 0, 3, 2)
        head, mid, tail = (g[b] for g in q_groups)  # (chunks, Hq, T, d)
        # Slicing the window view would cost a zero-filled gradient of the whole (3x K-sized) view per slice
        # in backward: the regular chunks use every window, and border chunks take their window from k/v.
        regular = (win_k, win_v) if hi - lo == n_windows else (win_k[: hi - lo], win_v[: hi - lo])
        groups = [(lo, mid, *regular)]
        if lo > 0:  # top border chunks: all use window 0
            groups.insert(0, (0, head, *(x.narrow(1, 0, span).unsqueeze(0).expand(lo, -1, -1, -1)
                                         for x in (kb, vb))))
        if hi < n:  # bottom border chunks: all use the last window
            m = n - hi
            groups.append((hi, tail, *(x.narrow(1, N - span, span).unsqueeze(0).expand(m, -1, -1, -1)
                                       for x in (kb, vb))))
        for first, qg, kg, vg in groups:
            if qg.shape[0] == 0:
                continue
            yield b, first, F.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True)


def _bna_row_chunks(q, k, v, geom: TileGeometry) -> torch.Tensor:
    B, N, Hq, d = q.shape
    outs = [o.transpose(1, 2) for _, _, o in _row_chunk_parts(q, k, v, geom)]  # (chunks, T, Hq, d)
    return torch.cat(outs, dim=0).reshape(B, N, Hq, d)  # the one copy back to heads-last


@torch.no_grad()
def bna_lerp_into(q, k, v, geom: TileGeometry, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Inference-only fusion for ASSA: ``torch.lerp(BNA(q, k, v), end, weight)`` without materialising the
    local branch in heads-last order -- each chunk group's attention output is mixed straight into its rows
    of one output tensor, so the concatenation copy disappears into the mix. Row-chunk geometries only
    (``geom.is_identity_tiling``); ``end (B, N, Hq, d)``, ``weight`` broadcastable to it as ``(B, N, Hq, 1)``.
    Equal to the unfused expression (tested)."""
    if not geom.is_identity_tiling:
        raise ValueError("bna_lerp_into needs row chunks (tiles spanning the grid width, no padding)")
    B, N, Hq, d = q.shape
    T = geom.tile_tokens
    out = torch.empty(B, N, Hq, d, dtype=torch.result_type(q, end), device=q.device)
    rows = lambda x, b, c, n: x[b].unflatten(0, (-1, T))[c:c + n]  # noqa: E731  (chunks, T, ...)
    for b, first, o in _row_chunk_parts(q, k, v, geom):
        n = o.shape[0]
        torch.lerp(o.transpose(1, 2), rows(end, b, first, n), rows(weight, b, first, n), out=rows(out, b, first, n))
    return out


def _explicit_attention(q, k, v, mask=None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) [+ mask]) v`` written out (heads-first), GQA by repeating KV heads."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(torch.logical_not(mask), float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _bna_gather(q, k, v, geom: TileGeometry, views: bool = True) -> torch.Tensor:
    """``views=False`` (backend ``"tiles"``) never uses the overlapping-view fast path for row chunks: every
    layout goes through index gathers + one batched SDPA, which every exporter converts (Core ML has no
    ``unfold``)."""
    if geom.is_identity_tiling and views:
        return _bna_row_chunks(q, k, v, geom)
    B, N, Hq, d = q.shape
    Hk = k.shape[2]
    n_tiles = geom.n_tiles[0] * geom.n_tiles[1]
    T, K = geom.tile_tokens, geom.keys_per_query
    q_index, inverse, key_index, key_valid = _tables(geom, q.device)
    q, k, v = _pad_grid(q, geom), _pad_grid(k, geom), _pad_grid(v, geom)
    if geom.is_identity_tiling:
        qt = q.reshape(B * n_tiles, T, Hq, d)  # row chunks: tiles are already contiguous
    else:
        qt = q.index_select(1, q_index).reshape(B * n_tiles, T, Hq, d)
    # index_select (not advanced indexing): its backward is a parallel index_add, not a serial index_put.
    flat_keys = key_index.reshape(-1)
    kt = k.index_select(1, flat_keys).reshape(B * n_tiles, K, Hk, d)
    vt = v.index_select(1, flat_keys).reshape(B * n_tiles, K, Hk, d)
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :].expand(n_tiles, 1, T, K).repeat(B, 1, 1, 1)
    if views:
        out = F.scaled_dot_product_attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)  # (B*tiles, Hq, T, d)
    else:  # plain matmul/softmax: exporters lower SDPA with output strides their later views cannot follow
        out = _explicit_attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), mask)
    out = out.transpose(1, 2).reshape(B, n_tiles * T, Hq, d)
    if not geom.is_identity_tiling:
        out = out.index_select(1, inverse)  # back to padded raster order
    if geom.needs_padding:
        (H, W), (Hp, Wp) = geom.grid, geom.padded_grid
        out = out.reshape(B, Hp, Wp, Hq, d)[:, :H, :W].reshape(B, N, Hq, d)
    return out


# ----------------------------------------------------------------------------------------------
# flex_attention backend (inference; optional)
# ----------------------------------------------------------------------------------------------

_compiled_flex = None


@functools.lru_cache(maxsize=32)
def _flex_block_mask(geom: TileGeometry, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    T = geom.tile_tokens
    (nh, nw), (wh, ww) = geom.n_tiles, geom.window
    start_r = torch.from_numpy(_window_starts(nh, wh, geom.radius)).to(device)
    start_c = torch.from_numpy(_window_starts(nw, ww, geom.radius)).to(device)
    Np = nh * nw * T
    valid = None
    if geom.needs_padding:
        q_index = _gather_tables(geom)[0]
        H, W = geom.grid
        Wp = geom.padded_grid[1]
        r, c = q_index // Wp, q_index % Wp  # tile-major position -> padded raster coordinate
        valid = torch.from_numpy((r < H) & (c < W)).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        tq, tk = q_idx // T, kv_idx // T
        qr, qc, kr, kc = tq // nw, tq % nw, tk // nw, tk % nw
        sr, sc = start_r[qr], start_c[qc]
        ok = (kr >= sr) & (kr < sr + wh) & (kc >= sc) & (kc < sc + ww)
        if valid is not None:
            ok = ok & valid[kv_idx]
        return ok

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=Np, KV_LEN=Np, device=device)


def _bna_flex(q, k, v, geom: TileGeometry, compile: bool = False) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    if compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    B, N, Hq, d = q.shape
    q_index, inverse, _, _ = _tables(geom, q.device)
    q, k, v = _pad_grid(q, geom), _pad_grid(k, geom), _pad_grid(v, geom)
    qt, kt, vt = (x[:, q_index].transpose(1, 2) for x in (q, k, v))  # tile-major, heads-first
    block_mask = _flex_block_mask(geom, str(q.device))
    out = fn(qt, kt, vt, block_mask=block_mask, enable_gqa=qt.shape[1] != kt.shape[1])
    out = out.transpose(1, 2)[:, inverse]
    if geom.needs_padding:
        (H, W), (Hp, Wp) = geom.grid, geom.padded_grid
        out = out.reshape(B, Hp, Wp, Hq, d)[:, :H, :W].reshape(B, N, Hq, d)
    return out


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------

def block_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: TileGeometry,
                                 backend: str = "auto", compile: bool = False) -> torch.Tensor:
    """Blockwise neighborhood attention on heads-last tensors; returns ``(B, N, Hq, d)``.

    ``q``: ``(B, N, Hq, d)``; ``k``, ``v``: ``(B, N, Hkv, d)`` with ``Hq % Hkv == 0`` (GQA);
    ``N == H * W`` of ``geom.grid`` in raster order.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"BNA expects heads-last 4-D tensors (B, N, heads, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    N = geom.grid[0] * geom.grid[1]
    if q.shape[1] != N or k.shape[1] != N or v.shape[1] != N:
        raise ValueError(f"BNA grid {geom.grid} has {N} tokens but q/k/v have {q.shape[1]}/{k.shape[1]}/"
                         f"{v.shape[1]}")
    if k.shape != v.shape or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"BNA needs k and v of equal shape and query heads divisible by key heads; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if backend == "auto":
        backend = "fused" if use_fused_kernel(q, k, v, geom) else "gather"
    if backend == "gather":
        return _bna_gather(q, k, v, geom)
    if backend == "fused":
        check_fused_inputs(q, k, v, geom)
        return bna_rows(q, k, v, geom.tile_tokens, geom.window[0], geom.radius)
    if backend == "tiles":
        return _bna_gather(q, k, v, geom, views=False)
    if backend == "reference":
        return _bna_reference(q, k, v, geom)
    if backend == "flex":
        if torch.is_grad_enabled() and q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("BNA backend 'flex' has no backward pass on CPU (a PyTorch limitation); "
                               "use backend='gather' for training, or run under torch.no_grad()")
        return _bna_flex(q, k, v, geom, compile=compile)
    raise ValueError(f"unknown BNA backend {backend!r}; choose one of {BNA_BACKENDS}")
