"""Functional attention core. Every tensor is heads-last, ``(B, N, heads, head_dim)``, as it comes out
of a Linear projection; SDPA's heads-first layout is a free transpose inside these functions.

* :func:`attention` -- dense scaled-dot-product attention with grouped-query attention (GQA).
* :func:`compress_tokens` -- the ASSA global branch's 2x2 stride-2 depthwise convolution on a grid.
* :func:`assa_attention` -- Adaptive Sparse Self-Attention: global attention on compressed keys/values
  and blockwise neighbourhood attention, mixed per head by a sigmoid gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bna import TileGeometry, auto_backend, block_neighborhood_attention, bna_lerp_into, check_fused_inputs
from .cpu_kernel import bna_rows_lerp
from .rope import apply_rope

__all__ = ["attention", "compress_tokens", "assa_attention"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention. ``q (B, N, Hq, d)``, ``k, v (B, M, Hkv, d)``, ``Hq % Hkv == 0``; returns ``(B, N, Hq, d)``.

    ``key_mask``: optional ``(B, M)`` boolean, ``True`` for keys that may be attended to. Query rows whose
    keys are all masked return zeros (not NaN).
    """
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    mask = None
    if key_mask is not None:
        if key_mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_mask must be (B, M)={tuple(k.shape[:2])}, got {tuple(key_mask.shape)}")
        key_mask = key_mask.bool()
        has_key = key_mask.any(dim=1)  # (B,)
        # A row with no valid key would give NaN in softmax: let it see everything, then zero its output.
        # logical_* rather than | and ~: Core ML has no bitwise ops on booleans
        mask = torch.logical_or(key_mask, torch.logical_not(has_key)[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    if key_mask is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


def compress_tokens(x: torch.Tensor, grid: tuple[int, int], weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """2x2 stride-2 depthwise convolution of tokens on an ``H x W`` grid.

    ``x (B, H*W, heads, d)`` -> ``(B, H/2 * W/2, heads, d)``; ``weight`` has the depthwise ``Conv2d``
    shape ``(heads*d, 1, 2, 2)``. The tokens are handed to ``conv2d`` as a channels-last view (no copy),
    which oneDNN runs directly; measured 4x faster here than strided multiply-adds.
    """
    B, N, h, d = x.shape
    H, W = grid
    if H * W != N:
        raise ValueError(f"grid {grid} has {H * W} tokens, input has {N}")
    if H % 2 or W % 2:
        raise ValueError(f"KV compression needs an even token grid, got {H}x{W}; "
                         f"use a resolution whose token grid is a multiple of 2")
    C = h * d
    xc = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W) view, channels-last strides
    out = F.conv2d(xc, weight, bias, stride=2, groups=C)  # (B, C, H/2, W/2)
    return out.permute(0, 2, 3, 1).reshape(B, (H // 2) * (W // 2), h, d)


def assa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor,
                   geom: TileGeometry, k_weight: torch.Tensor, v_weight: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   rope_coarse: tuple[torch.Tensor, torch.Tensor] | None = None,
                   k_bias: torch.Tensor | None = None, v_bias: torch.Tensor | None = None,
                   backend: str = "auto", compile: bool | None = None) -> torch.Tensor:
    """Adaptive Sparse Self-Attention on one token grid.

    ``q (B, N, Hq, d)``, ``k, v (B, N, Hkv, d)`` after QK-norm and *before* RoPE; ``gate_logits (B, N, Hq)``.
    ``rope``/``rope_coarse``: ``(cos, sin)`` tables for the full grid and for the 2x2-cell centres.

    * global: ``k_c, v_c = conv2x2(k), conv2x2(v)`` (4x fewer keys); queries at full resolution;
      compressed keys get RoPE at their cell centres, so both sides share one coordinate frame.
    * local: blockwise neighbourhood attention on the full-resolution keys.
    * ``out = g * global + (1 - g) * local`` with ``g = sigmoid(gate_logits)`` per token and head.

    ``backend``/``compile`` choose the BNA backend (``compile`` applies to ``"flex"`` only; ``None``: compiled
    on CUDA, see :func:`snapgen.attention.flex.flex_compiles`).
    """
    if backend == "auto":  # decided on the projected tensors, before RoPE makes new ones
        backend = auto_backend(q, k, v, geom)
    kc = compress_tokens(k, geom.grid, k_weight, k_bias)
    vc = compress_tokens(v, geom.grid, v_weight, v_bias)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kc = apply_rope(kc, *rope_coarse)
    out_global = attention(q, kc, vc)
    if backend == "fused":  # the local branch and the gate mix in one kernel call, forward and backward
        check_fused_inputs(q, k, v, geom)
        return bna_rows_lerp(q, k, v, out_global, torch.sigmoid(gate_logits), geom.tile_tokens, geom.window[0],
                             geom.radius)
    g = torch.sigmoid(gate_logits).unsqueeze(-1)  # (B, N, Hq, 1)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, out_global, g))
    if not needs_grad and backend == "gather" and geom.is_identity_tiling:
        # inference on row chunks: mix each chunk group's local output straight into the result
        return bna_lerp_into(q, k, v, geom, out_global, g)
    out_local = block_neighborhood_attention(q, k, v, geom, backend=backend, compile=compile)
    if needs_grad:
        return torch.lerp(out_local, out_global, g)  # local + g * (global - local), one pass
    return out_local.lerp_(out_global, g)  # inference: reuse the local output's (fresh) memory
