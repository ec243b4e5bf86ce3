"""Thin ``nn.Module`` wrappers around :mod:`snapgen.attention.functional`.

All modules take tokens ``x (B, N, dim)`` and return ``(B, N, dim)``. Self-attention modules also
take the token ``grid`` ``(H, W)`` and precomputed RoPE tables (computed once per stage and shared
by its blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.elastic import ElasticConv2d, ElasticLinear, ElasticModule, WidthSpec
from .bna import BNA_BACKENDS, make_geometry
from .functional import assa_attention, attention
from .rope import apply_rope

__all__ = ["SelfAttention", "AdaptiveSparseSelfAttention", "CrossAttention"]

RopeTables = tuple[torch.Tensor, torch.Tensor]


class _QKVProjection(ElasticModule, nn.Module):
    """q/k/v projections (GQA: ``kv_heads`` may be fewer than ``heads``), per-head QK LayerNorm, output projection.

    Width-elastic: the projections slice whole heads (constant ``head_dim``); the QK-norms are the
    per-width "lightweight" parameters, one pair per variant. ``kv_dim`` set (cross-attention) keeps the
    key/value *input* (the text width) unsliced."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, kv_dim: int | None = None,
                 variants: tuple[tuple[str, float], ...] = ()):
        super().__init__()
        if heads % kv_heads != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for GQA")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self_attention = kv_dim is None
        kv_dim = dim if kv_dim is None else kv_dim
        self.to_q = ElasticLinear(dim, heads * head_dim)
        self.to_k = ElasticLinear(kv_dim, kv_heads * head_dim, elastic_in=self_attention)
        self.to_v = ElasticLinear(kv_dim, kv_heads * head_dim, elastic_in=self_attention)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        if variants:
            self.qk_norm_variants = nn.ModuleDict({
                name: nn.ModuleDict({"norm_q": nn.LayerNorm(head_dim, eps=1e-6),
                                     "norm_k": nn.LayerNorm(head_dim, eps=1e-6)}) for name, _ in variants})
        self.to_out = ElasticLinear(heads * head_dim, dim)

    def _qk_norms(self, spec: WidthSpec | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if spec is None or spec.is_full:
            return self.norm_q, self.norm_k
        pair = self.qk_norm_variants[spec.name]
        return pair["norm_q"], pair["norm_k"]

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        nq, nk = self._qk_norms(spec)
        return {"norm_q.weight": nq.weight, "norm_q.bias": nq.bias, "norm_k.weight": nk.weight,
                "norm_k.bias": nk.bias}

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        context = x if context is None else context
        B, N, _ = x.shape
        M = context.shape[1]
        norm_q, norm_k = self._qk_norms(self.active)
        q = norm_q(self.to_q(x).view(B, N, -1, self.head_dim))
        k = norm_k(self.to_k(context).view(B, M, -1, self.head_dim))
        v = self.to_v(context).view(B, M, -1, self.head_dim)
        return q, k, v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out(o.flatten(2))


class SelfAttention(_QKVProjection):
    """Dense self-attention with GQA, QK-norm and 2-D RoPE (the Middle stage, and the dense ablation)."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int], rope: RopeTables | None = None,
                rope_coarse: RopeTables | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.output(attention(q, k, v))


class AdaptiveSparseSelfAttention(_QKVProjection):
    """ASSA (SnapGen++ Sec. 3.1): global attention over 2x2-compressed keys/values plus blockwise
    neighbourhood attention, interpolated per head by ``g = sigmoid(Linear(x))``.

    * The compression convs are depthwise 2x2 stride-2 (one for k, one for v), initialised as
      average pooling with zero bias, so compression starts as plain smoothing (PixArt-Sigma's choice).
    * The gate Linear is zero-initialised: ``g = 0.5`` at init, an even mix of both branches.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, bna_tile: tuple[int, int] = (4, 0),
                 bna_radius: int = 1, bna_backend: str = "auto", variants: tuple[tuple[str, float], ...] = ()):
        super().__init__(dim, heads, kv_heads, head_dim, variants=variants)
        if bna_backend not in BNA_BACKENDS:
            raise ValueError(f"unknown BNA backend {bna_backend!r}; choose one of {BNA_BACKENDS}")
        c = kv_heads * head_dim
        self.compress_k = ElasticConv2d(c, c, kernel_size=2, stride=2, groups=c)  # weights used functionally
        self.compress_v = ElasticConv2d(c, c, kernel_size=2, stride=2, groups=c)
        self.gate = ElasticLinear(dim, heads)
        self.bna_tile, self.bna_radius, self.bna_backend = tuple(bna_tile), bna_radius, bna_backend
        self._snapgen_init()

    def _snapgen_init(self) -> None:
        for conv in (self.compress_k, self.compress_v):
            nn.init.constant_(conv.weight, 0.25)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], rope: RopeTables | None = None,
                rope_coarse: RopeTables | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        geom = make_geometry(grid, self.bna_tile, self.bna_radius)
        ck = self.compress_k.active_parameters(self.compress_k.active)
        cv = self.compress_v.active_parameters(self.compress_v.active)
        o = assa_attention(q, k, v, self.gate(x), geom, ck["weight"], cv["weight"], rope=rope,
                           rope_coarse=rope_coarse, k_bias=ck.get("bias"), v_bias=cv.get("bias"),
                           backend=self.bna_backend)
        return self.output(o)


class CrossAttention(_QKVProjection):
    """Cross-attention from image tokens to a variable-length text sequence with a padding mask.

    Key/value projections read the text features directly (``text_dim -> heads*head_dim``), so they
    depend on the model width only on their output side (what elastic slicing needs).
    """

    def __init__(self, dim: int, text_dim: int, heads: int, head_dim: int,
                 variants: tuple[tuple[str, float], ...] = ()):
        super().__init__(dim, heads, heads, head_dim, kv_dim=text_dim, variants=variants)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, text)
        return self.output(attention(q, k, v, key_mask=text_mask))
