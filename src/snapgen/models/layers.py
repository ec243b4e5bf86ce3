"""Building blocks shared by the DiT families: timestep embedding, the modulated transformer block,
token down/up-sampling, skip fusion and the output layer.

Modulation is **adaLN-single with zero init** (PixArt-alpha lineage, which the paper's ablation starts
from): one shared ``SiLU -> Linear(width, 9*width)`` maps the timestep embedding to shift/scale/gate for
the three sub-layers (self-attention, cross-attention, FFN), and every block adds its own learned
``(9, width)`` table. Both start at zero, so every gate is 0 and every block is the identity at init;
the output layer is zero too, so a new model outputs exactly zero (adaLN-Zero). The per-block table is
the "lightweight width-specific modulation" that elastic training keeps per width. With
``ThreeStageDiTConfig.elastic_modulation = "per_width"`` the timestep MLP and the adaLN-single map are kept
per width too (each sub-network's own copy at its own width, :class:`PerWidthModulation`); by default
(``"shared"``) every width uses their leading slice.

Every projection is an :class:`~snapgen.nn.elastic.ElasticLinear`: at full width (the default, and any
non-elastic model) it is a plain ``nn.Linear``; under ``ThreeStageDiT.set_variant`` it computes with the
leading slice of its weights (see :mod:`snapgen.elastic`). ``variants`` (name -> width ratio) gives the
modules that hold per-width parameters one copy per sub-network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AdaptiveSparseSelfAttention, CrossAttention, SelfAttention
from ..nn.elastic import ElasticLayerNorm, ElasticLinear, ElasticModule, WidthSpec, active_size

__all__ = ["timestep_embedding", "TimestepEmbedder", "AdaLNSingle", "VariantLinear", "PerWidthModulation",
           "Mlp", "DiTBlock", "TokenDownsample", "TokenUpsample", "SkipFusion", "FinalLayer", "modulate",
           "variant_tables"]

Variants = tuple[tuple[str, float], ...]


def variant_tables(shape_of, variants: Variants) -> nn.ParameterDict:
    """One zero-initialised parameter per sub-network variant; ``shape_of(ratio)`` gives its shape."""
    return nn.ParameterDict({name: nn.Parameter(torch.zeros(shape_of(r))) for name, r in variants})

MOD_CHUNKS = 9  # (shift, scale, gate) x (self-attention, cross-attention, FFN)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos, sin]`` of ``1000 * t`` for flow time ``t`` in [0, 1] (t=1 is noise).

    The factor 1000 spreads [0, 1] over the range the classic ``max_period=10000`` frequencies were
    designed for; the teacher, student and critic must all use this same function.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class VariantLinear(nn.Module):
    """One sub-network's own fixed-size Linear (per-width modulation, ``elastic_modulation="per_width"``).
    Not an ``nn.Linear`` on purpose: DiT's xavier init skips it (no random numbers drawn, so a per-width model
    initialises every other weight exactly like a shared one) and its owner fills it with the full layer's
    leading slice (:meth:`copy_full_to_variants_`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PerWidthModulation(ElasticModule):
    """Mixin for the modulation modules that ``elastic_modulation="per_width"`` keeps one copy of per
    sub-network: ``_pairs`` lists ``(standalone name, full ElasticLinear, {variant: VariantLinear})``. At a
    sub-network's width the forward pass uses its own copy, and ``active_parameters`` reports that copy under
    the standalone names, which extraction prefers over the children's slicing rule (parents come first)."""

    _ratios: dict[str, float] = {}

    def _pairs(self):  # pragma: no cover
        raise NotImplementedError

    def per_width_layers(self) -> list[str]:
        """Local names of the full layers that have per-width copies (none in a shared model)."""
        return [name for name, _, copies in self._pairs() if copies]

    def _own(self, spec: WidthSpec | None) -> bool:
        return spec is not None and not spec.is_full and spec.name in self._ratios

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        if not self._own(spec):
            return {}  # shared (or full width): the ElasticLinear children report their own (sliced) weights
        out = {}
        for name, _, copies in self._pairs():
            out[f"{name}.weight"], out[f"{name}.bias"] = copies[spec.name].weight, copies[spec.name].bias
        return out

    @torch.no_grad()
    def copy_full_to_variants_(self) -> None:
        """Set every sub-network's own copy to the full layer's leading slice (what "shared" uses)."""
        for _, full, copies in self._pairs():
            for variant, copy in copies.items():
                p = full.active_parameters(WidthSpec(variant, self._ratios[variant]))
                copy.weight.copy_(p["weight"])
                copy.bias.copy_(p["bias"])


class TimestepEmbedder(PerWidthModulation, nn.Module):
    """Sinusoids of ``t`` -> ``Linear -> SiLU -> Linear`` to the model width. With ``variants`` (per-width
    modulation) every sub-network has its own MLP at its own width in ``mlp_variants[name]``."""

    def __init__(self, width: int, freq_dim: int = 256, variants: Variants = ()):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ElasticLinear(freq_dim, width, elastic_in=False), nn.SiLU(),
                                 ElasticLinear(width, width))
        self._ratios = dict(variants)
        if variants:
            self.mlp_variants = nn.ModuleDict({
                name: nn.Sequential(VariantLinear(freq_dim, active_size(width, r)), nn.SiLU(),
                                    VariantLinear(active_size(width, r), active_size(width, r)))
                for name, r in variants})
        self._snapgen_init()

    def _pairs(self):
        own = getattr(self, "mlp_variants", {})
        return [(f"mlp.{i}", self.mlp[i], {n: seq[i] for n, seq in own.items()}) for i in (0, 2)]

    def _snapgen_init(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.copy_full_to_variants_()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp_variants[self.active.name] if self._own(self.active) else self.mlp
        # sinusoids of fp32 times, then the model's dtype (a no-op in fp32; fp16/bf16/fp64 models work too)
        return mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class AdaLNSingle(PerWidthModulation, nn.Sequential):
    """The shared ``SiLU -> Linear(width, 9*width)`` timestep projection, zero-initialised (adaLN-Zero).
    With ``variants`` (per-width modulation) every sub-network has its own ``Linear(w, 9w)`` in
    ``linear_variants[name]`` (the ``Sequential`` keeps its standalone keys ``0``/``1``; forward is
    explicit)."""

    def __init__(self, width: int, variants: Variants = ()):
        super().__init__(nn.SiLU(), ElasticLinear(width, MOD_CHUNKS * width, out_chunks=MOD_CHUNKS))
        self._ratios = dict(variants)
        if variants:
            self.linear_variants = nn.ModuleDict({
                name: VariantLinear(active_size(width, r), MOD_CHUNKS * active_size(width, r))
                for name, r in variants})
        self._snapgen_init()

    def _pairs(self):
        return [("1", self[1], dict(getattr(self, "linear_variants", {})))]

    def _snapgen_init(self) -> None:
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)
        self.copy_full_to_variants_()

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        linear = self.linear_variants[self.active.name] if self._own(self.active) else self[1]
        return linear(self[0](t_emb))


class Mlp(nn.Module):
    """FFN: Linear -> GELU(tanh) -> Linear (PixArt's FFN; the paper does not state the activation)."""

    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(round(width * ratio))
        self.fc1 = ElasticLinear(width, hidden)
        self.fc2 = ElasticLinear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` in one fused pass over ``x`` (these tensors are the big ones on CPU)."""
    return torch.addcmul(shift, x, 1 + scale)


class DiTBlock(ElasticModule, nn.Module):
    """LN -> modulate -> self-attention (ASSA or dense) -> gate -> add; same for cross-attention to text
    and for the FFN. ``cond`` is the shared ``(B, 9, width)`` modulation; the block adds its own table
    (one per width variant in an elastic model)."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, mlp_ratio: float, text_dim: int,
                 attention: str = "dense", bna_tile: tuple[int, int] = (4, 0), bna_radius: int = 1,
                 bna_backend: str = "gather", variants: Variants = ()):
        super().__init__()
        self.norm1 = ElasticLayerNorm(width)
        if attention == "assa":
            self.attn = AdaptiveSparseSelfAttention(width, heads, kv_heads, head_dim, bna_tile, bna_radius,
                                                    bna_backend, variants=variants)
        elif attention == "dense":
            self.attn = SelfAttention(width, heads, kv_heads, head_dim, variants=variants)
        else:
            raise ValueError(f"unknown attention kind {attention!r}; use 'assa' or 'dense'")
        self.norm2 = ElasticLayerNorm(width)
        self.cross_attn = CrossAttention(width, text_dim, heads, head_dim, variants=variants)
        self.norm3 = ElasticLayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio)
        self.modulation = nn.Parameter(torch.zeros(MOD_CHUNKS, width))
        if variants:
            self.modulation_variants = variant_tables(lambda r: (MOD_CHUNKS, active_size(width, r)), variants)

    def _snapgen_init(self) -> None:
        nn.init.zeros_(self.modulation)
        for p in getattr(self, "modulation_variants", {}).values():
            nn.init.zeros_(p)

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        if spec is None or spec.is_full:
            return {"modulation": self.modulation}
        return {"modulation": self.modulation_variants[spec.name]}

    def forward(self, x, cond, grid, rope, rope_coarse, text, text_mask):
        table = self.active_parameters(self.active)["modulation"]
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3) = (cond + table).unbind(1)  # each (B, width)
        # x + gate * f(...) as one fused addcmul per sub-layer
        x = torch.addcmul(x, g1[:, None], self.attn(modulate(self.norm1(x), sh1[:, None], sc1[:, None]), grid,
                                                    rope, rope_coarse))
        x = torch.addcmul(x, g2[:, None], self.cross_attn(modulate(self.norm2(x), sh2[:, None], sc2[:, None]),
                                                          text, text_mask))
        x = torch.addcmul(x, g3[:, None], self.mlp(modulate(self.norm3(x), sh3[:, None], sc3[:, None])))
        return x


class TokenDownsample(nn.Module):
    """2x2 token merge: gather each 2x2 cell's tokens (pixel-unshuffle) and project ``4*width -> width``.
    Initialised as average pooling, so the Middle stage starts from a smoothed copy of the Down output."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = ElasticLinear(4 * width, width, in_chunks=4)
        self._snapgen_init()

    @torch.no_grad()
    def _snapgen_init(self) -> None:
        width = self.proj.out_features
        self.proj.weight.copy_(torch.eye(width).repeat(1, 4) / 4)
        self.proj.bias.zero_()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        H, W = grid
        # (row-in-cell i, col-in-cell j, channel) order; rank <= 5 throughout (Core ML's limit)
        x = x.reshape(B, H // 2, 2, W // 2, 2 * D).permute(0, 1, 3, 2, 4).reshape(B, N // 4, 4 * D)
        return self.proj(x)


class TokenUpsample(nn.Module):
    """Project ``width -> 4*width`` and pixel-shuffle each token into a 2x2 cell. Initialised as nearest
    replication."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = ElasticLinear(width, 4 * width, out_chunks=4)
        self._snapgen_init()

    @torch.no_grad()
    def _snapgen_init(self) -> None:
        width = self.proj.in_features
        self.proj.weight.copy_(torch.eye(width).repeat(4, 1))
        self.proj.bias.zero_()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``grid`` is the coarse grid of ``x``; returns tokens on the ``2H x 2W`` grid."""
        B, N, D = x.shape
        H, W = grid
        x = self.proj(x).reshape(B, H, W, 2, 2 * D).permute(0, 1, 3, 2, 4)  # rank <= 5 (Core ML's limit)
        return x.reshape(B, 4 * N, D)


class SkipFusion(nn.Module):
    """U-ViT long skip: ``Linear(concat(x, skip))``, initialised as the average ``(x + skip) / 2`` so both
    paths are open from the first step and the activation scale is kept."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = ElasticLinear(2 * width, width, in_chunks=2)
        self._snapgen_init()

    @torch.no_grad()
    def _snapgen_init(self) -> None:
        width = self.proj.out_features
        self.proj.weight.copy_(torch.eye(width).repeat(1, 2) / 2)
        self.proj.bias.zero_()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, skip], dim=-1))


class FinalLayer(ElasticModule, nn.Module):
    """LN -> modulate (own table + timestep embedding, PixArt's T2IFinalLayer) -> Linear to patch values.
    The Linear is zero-initialised: a new model outputs exactly zero."""

    def __init__(self, width: int, out_features: int, variants: Variants = ()):
        super().__init__()
        self.norm = ElasticLayerNorm(width)
        self.modulation = nn.Parameter(torch.zeros(2, width))
        if variants:
            self.modulation_variants = variant_tables(lambda r: (2, active_size(width, r)), variants)
        self.linear = ElasticLinear(width, out_features, elastic_out=False)
        self._snapgen_init()

    def _snapgen_init(self) -> None:
        nn.init.zeros_(self.modulation)
        for p in getattr(self, "modulation_variants", {}).values():
            nn.init.zeros_(p)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        if spec is None or spec.is_full:
            return {"modulation": self.modulation}
        return {"modulation": self.modulation_variants[spec.name]}

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        table = self.active_parameters(self.active)["modulation"]
        shift, scale = (table[None] + t_emb[:, None]).unbind(1)
        return self.linear(modulate(self.norm(x), shift[:, None], scale[:, None]))
