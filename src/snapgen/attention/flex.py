"""BNA on ``torch.nn.attention.flex_attention``: the GPU path of ASSA's local branch (SnapGen++ Sec. 3.1) --
backend ``"flex"``, and what ``"auto"`` runs on CUDA -- forward and backward.

* **Layout.** Tokens go to tile-major order: row chunks (tiles spanning the width) already are in it, other
  layouts take one index gather (the tables of ``tiling.py``); heads-first views, no copies. The output
  comes back the same way, padded queries dropped.
* **Mask.** A ``mask_mod`` states the BNA rule on tile-major positions with the window starts of
  ``tiling.py`` (query tile ``(i, j)`` sees key tiles ``[s_i, s_i + wh) x [s_j, s_j + ww)``, padded keys
  never), and ``create_block_mask`` turns it into the block-sparse layout: flex skips empty blocks and masks
  partial ones. So flex attends over exactly the reference's keys (tested: values and q/k/v gradients).
  One block mask per (geometry, device, sequence length), cached; building one evaluates the mask_mod on
  the whole ``Np x Np`` grid on the device, once per geometry.
* **Compilation.** flex_attention is fast only compiled (eagerly it materialises the whole score matrix).
  On CUDA it runs as ``torch.compile(flex_attention, dynamic=False)``, created once per process on first
  use; elsewhere eagerly (eager flex on CPU is forward only, a PyTorch limitation) -- unless the
  ``compile`` argument or ``SNAPGEN_FLEX_COMPILE`` (:func:`snapgen.env.flex_compile`) says otherwise. Inside
  a graph that is itself being compiled, plain ``flex_attention`` is traced into it. With ``dynamic=False``
  each new shape or geometry compiles anew; the compiled calls raise dynamo's recompile limit (8 by default)
  to :data:`FLEX_RECOMPILE_LIMIT` while they run, since past the limit dynamo would run eager flex, whose
  ``B x heads x N x N`` scores do not fit in memory at large grids.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .. import env
from .tiling import TileGeometry, _crop_grid, _gather_tables, _pad_grid, _tables, _window_starts

__all__ = ["FLEX_RECOMPILE_LIMIT", "bna_flex", "compiled_flex_attention", "flex_block_mask", "flex_compiles"]

# distinct (shape, geometry, grad mode) combinations one process may compile: a model with a few
# resolution buckets, its training batch and its (CFG-doubled) sampling batch stays well below it
FLEX_RECOMPILE_LIMIT = 64


def _build_block_mask(geom: TileGeometry, device: str, seq_len: int):
    T = geom.tile_tokens
    (nh, nw), (wh, ww) = geom.n_tiles, geom.window
    if seq_len != nh * nw * T:
        raise ValueError(f"flex block mask: {seq_len} tokens given, but geometry {geom} has {nh * nw * T} "
                         f"(padded) tokens")
    start_r = torch.from_numpy(_window_starts(nh, wh, geom.radius)).to(device)
    start_c = torch.from_numpy(_window_starts(nw, ww, geom.radius)).to(device)
    valid = None
    if geom.needs_padding:
        q_index = _gather_tables(geom)[0]  # tile-major position -> padded raster token id
        (H, W), Wp = geom.grid, geom.padded_grid[1]
        valid = torch.from_numpy((q_index // Wp < H) & (q_index % Wp < W)).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        tq, tk = q_idx // T, kv_idx // T  # tile ids, row-major over the tile grid
        qr, qc, kr, kc = tq // nw, tq % nw, tk // nw, tk % nw
        sr, sc = start_r[qr], start_c[qc]
        ok = (kr >= sr) & (kr < sr + wh) & (kc >= sc) & (kc < sc + ww)
        if valid is not None:
            ok = ok & valid[kv_idx]
        return ok

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


@functools.lru_cache(maxsize=32)
def flex_block_mask(geom: TileGeometry, device: str, seq_len: int):
    """The ``BlockMask`` of ``geom`` on ``seq_len`` tile-major (padded) tokens, on ``device`` (a string such
    as ``"cuda:0"``); cached per (geometry, device, sequence length)."""
    return _build_block_mask(geom, device, seq_len)


def _block_mask(geom: TileGeometry, device: torch.device, seq_len: int):
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # never cache what a trace creates (fake tensors would poison the cache for later eager calls)
        return _build_block_mask(geom, str(device), seq_len)
    return flex_block_mask(geom, str(device), seq_len)


def flex_compiles(device: torch.device, compile: bool | None = None) -> bool:
    """Whether flex runs compiled: ``compile`` when given; else ``SNAPGEN_FLEX_COMPILE``: ``auto`` (default)
    compiles on CUDA only, ``on`` everywhere (CPU: inductor's C++ template), ``off`` nowhere."""
    if compile is not None:
        return bool(compile)
    mode = env.flex_compile()
    return mode == "on" or (mode == "auto" and device.type == "cuda")


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, created once per process (on the first call)."""
    return torch.compile(flex_attention, dynamic=False)


def _refuse_cpu_backward(q, k, v) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("BNA backend 'flex' has no backward pass on CPU (a PyTorch limitation); use "
                           "backend='auto' or 'gather' for training, or run under torch.no_grad()")


def bna_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: TileGeometry,
             compile: bool | None = None) -> torch.Tensor:
    """BNA with flex_attention on heads-last ``q (B, N, Hq, d)``, ``k, v (B, N, Hkv, d)``; ``compile``: see
    :func:`flex_compiles`. Differentiable wherever flex is (CUDA; not CPU)."""
    _refuse_cpu_backward(q, k, v)
    q, k, v = _pad_grid(q, geom), _pad_grid(k, geom), _pad_grid(v, geom)
    reorder = geom.n_tiles[1] > 1  # one tile per row of tiles (row chunks): raster order is tile-major
    if reorder:
        q_index, inverse = _tables(geom, q.device)[:2]
        q, k, v = (x.index_select(1, q_index) for x in (q, k, v))  # index_select: backward is index_add
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, Np, d) views
    kwargs = {"block_mask": _block_mask(geom, q.device, qt.shape[2]), "enable_gqa": qt.shape[1] != kt.shape[1]}
    if torch.compiler.is_compiling() or not flex_compiles(q.device, compile):
        out = flex_attention(qt, kt, vt, **kwargs)
    else:
        limit = max(FLEX_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            out = compiled_flex_attention()(qt, kt, vt, **kwargs)
    out = out.transpose(1, 2)  # (B, Np, Hq, d)
    if reorder:
        out = out.index_select(1, inverse)  # back to padded raster order
    return _crop_grid(out, geom)
