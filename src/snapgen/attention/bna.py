"""Blockwise Neighborhood Attention (BNA): the local branch of ASSA.

Geometry: ``tiling.py`` (tiles of ``tile = (th, tw)`` tokens, ``0`` = the whole axis; each query tile
attends to the ``(2r+1) x (2r+1)`` tiles around it, windows shifted inward at the borders; grids the tile
does not divide are padded, padded keys masked and padded queries dropped).

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
* ``"flex"``: ``torch.nn.attention.flex_attention`` on tile-major tokens with a cached block mask
  (``flex.py``): the GPU path, forward and backward, compiled on CUDA. Inference only on CPU (PyTorch has no
  CPU backward for flex), where it runs eagerly unless ``compile=True`` / ``SNAPGEN_FLEX_COMPILE=1``.
* ``"fused"``: snapgen's own CPU kernel for row chunks (``cpu_kernel.py``, ``csrc/bna_rows_cpu.cpp``): one
  exact-softmax block per (chunk, head), dK/dV accumulated straight into the key/value gradient. fp32 CPU,
  row-chunk geometries only; compiled with g++ on first use.
* ``"auto"`` (the model default): on CUDA ``flex`` (fp16/bf16/fp32, head size >= 16); on CPU ``fused`` where
  it applies and is faster -- fp32, row chunks of fewer than 768 tokens (from 768 query rows PyTorch's flash
  kernel switches to 256-row blocks and matches it), kernel built; otherwise, and always while
  tracing/exporting/compiling, ``gather`` (decided in ``backend.py``, which logs each choice once with its
  reason; :func:`snapgen.attention.backend_report`).

The dense ``reference`` is no oracle for non-finite inputs: SDPA's additive mask lets a NaN/Inf in a key
*outside* a query's window through (NaN + -inf = NaN, 0 * Inf = NaN). ``gather``, ``tiles`` and ``fused``
touch only the window's keys. ``flex`` masks scores (a NaN key outside the window stays out) but multiplies
masked, zero probabilities by the values it loads -- those of partial blocks when compiled, all of them
eagerly -- so an Inf in ``v`` can reach queries outside its window (eager CPU: every query of that head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import FUSED_MAX_TILE_TOKENS, auto_backend, check_fused_inputs, use_fused_kernel
from .cpu_kernel import bna_rows
from .flex import bna_flex
from .tiling import TileGeometry, _crop_grid, _pad_grid, _tables, bna_mask, make_geometry

__all__ = ["TileGeometry", "make_geometry", "bna_mask", "block_neighborhood_attention", "bna_lerp_into",
           "BNA_BACKENDS", "FUSED_MAX_TILE_TOKENS", "auto_backend", "check_fused_inputs", "use_fused_kernel"]

BNA_BACKENDS = ("auto", "gather", "fused", "tiles", "reference", "flex")


# ----------------------------------------------------------------------------------------------
# Reference: dense SDPA with an explicit boolean mask
# ----------------------------------------------------------------------------------------------

def _bna_reference(q, k, v, geom: TileGeometry) -> torch.Tensor:
    mask = bna_mask(geom).to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Gather backend: tiles folded into the batch, one dense SDPA
# ----------------------------------------------------------------------------------------------

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
    return _crop_grid(out, geom)


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------

def block_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: TileGeometry,
                                 backend: str = "auto", compile: bool | None = None) -> torch.Tensor:
    """Blockwise neighborhood attention on heads-last tensors; returns ``(B, N, Hq, d)``.

    ``q``: ``(B, N, Hq, d)``; ``k``, ``v``: ``(B, N, Hkv, d)`` with ``Hq % Hkv == 0`` (GQA);
    ``N == H * W`` of ``geom.grid`` in raster order. ``compile`` applies to ``flex`` only: ``None`` compiles
    on CUDA (or as ``SNAPGEN_FLEX_COMPILE`` says), ``True`` / ``False`` force it.
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
        backend = auto_backend(q, k, v, geom)
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
        return bna_flex(q, k, v, geom, compile=compile)
    raise ValueError(f"unknown BNA backend {backend!r}; choose one of {BNA_BACKENDS}")
