"""IsotropicDiT: the PixArt-style baseline of the paper's Fig. 3 ablation (step A).

Every block runs dense self-attention on the full token grid; no down/up-sampling, no skips. It reuses
the three-stage model's blocks, embedders and output layer, and takes the same config (its depth is the
sum of ``config.depths``; ``mlp_ratio_middle`` is used for every block, as step A uses FFN ratio 3).
It exists for benchmarks and comparisons, not for training recipes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import grid_positions, rope_angles
from .config import ThreeStageDiTConfig
from .base import DenoiserMixin
from .registry import register_model
from .three_stage_dit import basic_init, text_denoiser_inputs, unpatchify
from ..nn.io import ModelIOMixin
from .layers import MOD_CHUNKS, AdaLNSingle, DiTBlock, FinalLayer, TimestepEmbedder

__all__ = ["IsotropicDiT"]


@register_model("isotropic_dit", config=ThreeStageDiTConfig, default_for_config=False)
class IsotropicDiT(DenoiserMixin, ModelIOMixin, nn.Module):
    config_class = ThreeStageDiTConfig
    feature_taps = ("last",)

    def __init__(self, config: ThreeStageDiTConfig):
        super().__init__()
        if config.elastic_modulation != "shared":
            raise ValueError("IsotropicDiT is not width-elastic: elastic_modulation='per_width' applies to "
                             "the three_stage_dit family only (use ThreeStageDiT, or 'shared')")
        self.config = cfg = config
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D, cfg.time_freq_dim)
        self.t_block = AdaLNSingle(D)
        self.text_norm = nn.LayerNorm(cfg.text_dim, eps=1e-6)
        self.blocks = nn.ModuleList([
            DiTBlock(D, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_ratio_middle, cfg.text_dim, "dense")
            for _ in range(sum(cfg.depths))])
        self.final_layer = FinalLayer(D, p * p * cfg.in_channels)
        basic_init(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None, *legacy, features=(), **legacy_kw):
        """The Denoiser interface (:mod:`snapgen.models.base`); ``cond = {"text": ..., "text_mask": ...}``."""
        cfg = self.config
        t, text, text_mask, features, legacy_return = text_denoiser_inputs(self, x, t, cond, legacy, legacy_kw,
                                                                           features, cfg.patch_size)
        B, _, h, w = x.shape
        grid = (h // cfg.patch_size, w // cfg.patch_size)
        xs = self.patch_embed(x).flatten(2).transpose(1, 2)
        t_emb = self.t_embedder(t)
        cond = self.t_block(t_emb).view(B, MOD_CHUNKS, cfg.width)
        text = self.text_norm(text)
        rope = rope_angles(grid_positions(*grid, device=x.device), cfg.head_dim, cfg.rope_theta)
        for blk in self.blocks:
            xs = blk(xs, cond, grid, rope, None, text, text_mask)
        out = unpatchify(self.final_layer(xs, t_emb), grid, cfg.patch_size, cfg.in_channels)
        if legacy_return:
            return out, xs
        return (out, {"last": xs}) if features else out

    def stages(self, latent_hw: tuple[int, int]) -> list[dict]:
        cfg = self.config
        gh, gw = latent_hw[0] // cfg.patch_size, latent_hw[1] // cfg.patch_size
        return [{"name": "blocks", "blocks": sum(cfg.depths), "grid": [gh, gw], "tokens": gh * gw,
                 "attention": "dense"}]
