"""ThreeStageDiT: the SnapGen++ backbone [SnapGen++ Sec. 3.1, Fig. 2] (arXiv 2601.08303); registered as the
model family ``three_stage_dit`` with presets ``snapgenpp/<name>`` (see :mod:`snapgen.models.registry`).

::

    latent (B, C, h, w)
      -> patchify 2x2                                   tokens on the full grid  (h/2 x w/2)
      -> Down   stage: depths[0] blocks, ASSA           full grid
      -> TokenDownsample 2x2                            coarse grid (h/4 x w/4), 4x fewer tokens
      -> Middle stage: depths[1] blocks, dense SA, U-ViT long skips (first half -> second half)
      -> TokenUpsample 2x2                              full grid
      -> SkipFusion with the Down output
      -> Up     stage: depths[2] blocks, ASSA           full grid
      -> FinalLayer + unpatchify                        velocity v = eps - x0, (B, C, h, w)

Every block: adaLN-modulated self-attention (GQA, QK-norm, 2-D RoPE), cross-attention to the text
sequence (with its padding mask), FFN (ratio 4 in Down/Up, 3 in Middle); each sub-layer has its own
gate. Flow time ``t`` is in [0, 1] with ``t = 1`` pure noise (see ``docs/conventions.md``).

RoPE frames: the full grid uses integer token coordinates; coarse tokens (compressed keys of ASSA's
global branch and the Middle stage's tokens) sit at the centres of their 2x2 cells, ``2i + 0.5``, in
that same frame. Design choices that the paper leaves open are listed in ``docs/architecture.md``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from ..attention import grid_positions, rope_angles
from .config import PRESETS, ThreeStageDiTConfig
from ..nn.elastic import ElasticConv2d, ElasticModule, WidthSpec
from ..nn.io import ModelIOMixin
from .base import DenoiserMixin, check_features, denoiser_call
from .layers import MOD_CHUNKS, AdaLNSingle, DiTBlock, FinalLayer, SkipFusion, TimestepEmbedder, TokenDownsample, TokenUpsample
from .multiscale import MultiScaleIO
from .registry import register_model

__all__ = ["ThreeStageDiT", "basic_init", "check_inputs", "check_latent_size", "unpatchify"]


def basic_init(model: nn.Module) -> None:
    """DiT's init: xavier-uniform Linear/patch-embed weights, zero biases; then every module's own
    ``_snapgen_init`` (zero modulation/gates/output, average-pool compression, identity skips...)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if hasattr(m, "_snapgen_init"):
            m._snapgen_init()


def check_latent_size(h: int, w: int, multiple: int, vae_factor: int) -> None:
    if h % multiple == 0 and w % multiple == 0 and h > 0 and w > 0:
        return

    def near(n):
        lo = (n // multiple) * multiple
        return [s for s in (lo, lo + multiple) if s > 0]

    hs, ws = near(h), near(w)
    raise ValueError(
        f"latent size {h}x{w} is not supported: height and width must be multiples of {multiple} latent "
        f"pixels ({multiple * vae_factor} image pixels at VAE factor {vae_factor}). Nearest valid latent "
        f"sizes: height {hs}, width {ws} (images {[x * vae_factor for x in hs]} x {[x * vae_factor for x in ws]})")


TEXT_COND_KEYS = ("text", "text_mask")


def read_text_cond(cond, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(text, text_mask)`` of a text-conditioned image denoiser's ``cond`` dict; unknown keys are errors."""
    unknown = sorted(set(cond) - set(TEXT_COND_KEYS))
    if unknown:
        raise ValueError(f"{family} got unknown cond keys {unknown}; it reads {list(TEXT_COND_KEYS)}")
    if "text" not in cond:
        raise ValueError(f"{family} needs cond['text'] (B, L, text_dim) encoder features")
    return cond["text"], cond.get("text_mask")


def text_denoiser_inputs(model, x, t, cond, legacy: tuple, legacy_kw: dict, features, multiple: int):
    """The shared preamble of a text-conditioned image denoiser's ``forward``: the call normalised (legacy form
    included), taps and cond checked -> ``(t (B,), text, text_mask, features, legacy_return)``."""
    cond, features, legacy_return = denoiser_call(cond, legacy, legacy_kw, features, stacklevel=6)
    features = check_features(features, model.feature_taps, model.family)
    text, text_mask = read_text_cond(cond, model.family)
    t = check_inputs(model.config, x, t, text, text_mask, multiple)
    return t, text, text_mask, features, legacy_return


def check_inputs(cfg: ThreeStageDiTConfig, x, t, text, text_mask, multiple: int) -> torch.Tensor:
    """Validate a denoiser call (clear errors naming the problem) and return ``t`` as a ``(B,)`` tensor."""
    if x.dim() != 4:
        raise ValueError(f"latent must be (B, C, h, w), got shape {tuple(x.shape)}")
    B, C, h, w = x.shape
    if C != cfg.in_channels:
        raise ValueError(f"latent has {C} channels but the model expects in_channels={cfg.in_channels}")
    check_latent_size(h, w, multiple, cfg.vae_factor)
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must be a scalar or shape ({B},), got {tuple(t.shape)}")
    if text.dim() != 3 or text.shape[0] != B or text.shape[2] != cfg.text_dim:
        raise ValueError(f"text must be (B={B}, L, text_dim={cfg.text_dim}), got {tuple(text.shape)}")
    if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"text_mask must be (B, L)={tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
    return t


def unpatchify(x: torch.Tensor, grid: tuple[int, int], p: int, c: int) -> torch.Tensor:
    """``(B, gh*gw, p*p*c)`` with feature order (p, q, c) -> ``(B, c, gh*p, gw*p)``."""
    B = x.shape[0]
    gh, gw = grid
    # rank <= 5 throughout (Core ML's limit): (B, gh, gw, p, p*c) -> (B, gh, p, gw, p*c) -> (B, H, W, c)
    x = x.reshape(B, gh, gw, p, p * c).permute(0, 1, 3, 2, 4).reshape(B, gh * p, gw * p, c)
    return x.permute(0, 3, 1, 2)


@register_model("three_stage_dit", config=ThreeStageDiTConfig, presets=PRESETS, namespace="snapgenpp")
class ThreeStageDiT(DenoiserMixin, ModelIOMixin, nn.Module):
    config_class = ThreeStageDiTConfig
    # (B, N, width) token maps: "down" after the Down stage (full grid), "middle" after the Middle stage
    # (coarse grid), "last" = the Up stage's output, what the final layer reads (SnapGen++'s feature KD)
    feature_taps = ("down", "middle", "last")

    def __init__(self, config: ThreeStageDiTConfig):
        super().__init__()
        if not isinstance(config, ThreeStageDiTConfig):
            raise TypeError(f"ThreeStageDiT takes a ThreeStageDiTConfig, got {type(config).__name__}; "
                            f"use snapgen.models.preset('small') or ThreeStageDiTConfig(...)")
        self.config = cfg = config
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = ElasticConv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        variants = cfg.elastic_variants  # ((name, ratio), ...) of the sub-networks; () = not elastic
        # timestep MLP + adaLN-single map: shared by all blocks; sliced per width ("shared") or one copy per
        # sub-network ("per_width", the paper's separate modulation layers)
        own = variants if cfg.elastic_modulation == "per_width" else ()
        self.t_embedder = TimestepEmbedder(D, cfg.time_freq_dim, variants=own)
        self.t_block = AdaLNSingle(D, variants=own)
        self.text_norm = nn.LayerNorm(cfg.text_dim, eps=1e-6)

        def block(attention: str, ratio: float) -> DiTBlock:
            return DiTBlock(D, cfg.heads, cfg.kv_heads, cfg.head_dim, ratio, cfg.text_dim, attention,
                            cfg.bna_tile, cfg.bna_radius, cfg.bna_backend, variants=variants)

        n_down, n_mid, n_up = cfg.depths
        self.down_blocks = nn.ModuleList([block(cfg.outer_attention, cfg.mlp_ratio) for _ in range(n_down)])
        self.downsample = TokenDownsample(D)
        self.middle_blocks = nn.ModuleList([block("dense", cfg.mlp_ratio_middle) for _ in range(n_mid)])
        n_skips = n_mid // 2 if cfg.middle_skips else 0
        self.middle_skips = nn.ModuleList([SkipFusion(D) for _ in range(n_skips)])
        self.upsample = TokenUpsample(D)
        self.stage_skip = SkipFusion(D) if cfg.stage_skip else None
        self.up_blocks = nn.ModuleList([block(cfg.outer_attention, cfg.mlp_ratio) for _ in range(n_up)])
        self.final_layer = FinalLayer(D, p * p * cfg.in_channels, variants=variants)
        # DFM: the coarser pyramid levels' embeddings / timestep embedders / heads (the finest uses the three above)
        self.dfm = None if cfg.dfm_levels == 1 else MultiScaleIO(
            cfg.dfm_levels, p, lambda q: ElasticConv2d(cfg.in_channels, D, kernel_size=q, stride=q),
            lambda: TimestepEmbedder(D, cfg.time_freq_dim, variants=own),
            lambda q: FinalLayer(D, q * q * cfg.in_channels, variants=variants))
        self.gradient_checkpointing = False
        self._variant = "full"
        self.initialize_weights()

    def initialize_weights(self) -> None:
        basic_init(self)
        for embed in [self.patch_embed, *(self.dfm.embeds if self.dfm is not None else ())]:
            w = embed.weight  # like a Linear on the flattened patch
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.bias)

    # --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, *legacy, features=(), **legacy_kw):
        """Predict the velocity ``v = eps - x0`` (the Denoiser interface, :mod:`snapgen.models.base`).

        x: ``(B, C, h, w)`` latent at flow time ``t``; t: ``(B,)`` or scalar in [0, 1] (1 = noise). A DFM model
        (``dfm_levels`` S > 1) takes the packed pyramid state (:meth:`snapgen.flow.pyramid.Pyramid.pack`) and ``t``
        of shape ``(B, S)``, and returns the packed velocity of every level;
        cond: ``{"text": (B, L, text_dim) encoder features, "text_mask": (B, L) bool, True = real token}``.
        ``features``: names from ``feature_taps``; then ``(v, {name: (B, N, width) tokens})`` is returned.
        The old call ``model(x, t, text, text_mask, return_features=True)`` still works (deprecated).
        """
        cfg = self.config
        if self.dfm is not None:  # the packed pyramid state; checks below run on its finest level
            levels, t_levels = self.dfm.split_inputs(x, t, cfg.in_channels)
            x, t = levels[-1], t_levels[:, -1]
        elif torch.is_tensor(t) and t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]  # a one-level DFM time table is the plain time
        t, text, text_mask, features, legacy_return = text_denoiser_inputs(self, x, t, cond, legacy, legacy_kw,
                                                                           features, cfg.downsample)
        B, _, h, w = x.shape
        p = cfg.patch_size
        grid = (h // p, w // p)
        coarse = (grid[0] // 2, grid[1] // 2)

        if self.dfm is None:
            tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
            t_emb = self.t_embedder(t)  # (B, D)
        else:  # per-level embeddings and timestep embeddings, summed [DFM Sec. 3.2]
            tokens, t_emb = self.dfm.embed(levels, t_levels, self.patch_embed, self.t_embedder)
        mod = self.t_block(t_emb).view(B, MOD_CHUNKS, -1)  # -1: the active width
        text = self.text_norm(text)
        rope = rope_angles(grid_positions(*grid, device=x.device), cfg.head_dim, cfg.rope_theta)
        rope_coarse = rope_angles(grid_positions(*coarse, stride=2.0, offset=0.5, device=x.device), cfg.head_dim,
                                  cfg.rope_theta)

        xs = tokens
        for blk in self.down_blocks:
            xs = self._run_block(blk, xs, mod, grid, rope, rope_coarse, text, text_mask)
        down_out = xs
        taps = {"down": xs} if "down" in features else {}

        xs = self.downsample(xs, grid)
        n_mid, n_skip = len(self.middle_blocks), len(self.middle_skips)
        stack = []
        for i, blk in enumerate(self.middle_blocks):
            if n_skip and i >= n_mid - n_skip:  # second half: fuse the mirrored first-half output
                xs = self.middle_skips[i - (n_mid - n_skip)](xs, stack.pop())
            xs = self._run_block(blk, xs, mod, coarse, rope_coarse, None, text, text_mask)
            if i < n_skip:
                stack.append(xs)
        if "middle" in features:
            taps["middle"] = xs
        xs = self.upsample(xs, coarse)
        if self.stage_skip is not None:
            xs = self.stage_skip(xs, down_out)

        for blk in self.up_blocks:
            xs = self._run_block(blk, xs, mod, grid, rope, rope_coarse, text, text_mask)
        if self.dfm is None:
            out = unpatchify(self.final_layer(xs, t_emb), grid, p, cfg.in_channels)
        else:
            out = self.dfm.heads_out(xs, t_emb, self.final_layer, lambda o, q: unpatchify(o, grid, q, cfg.in_channels))
        if legacy_return:
            return out, xs
        if features:
            taps["last"] = xs
            return out, {k: taps[k] for k in features}
        return out

    def _run_block(self, blk, *args):
        # Gradient checkpointing trades one extra block forward for not keeping its activations.
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    # --- width-elastic sub-networks (see snapgen.elastic) ----------------------------------------------
    @property
    def variants(self) -> dict[str, float]:
        """Sub-networks this model serves, name -> width ratio (``{"full": 1.0}`` for a non-elastic model)."""
        return {**dict(self.config.elastic_variants), "full": 1.0}

    @property
    def variant(self) -> str:
        """The active sub-network's name."""
        return self._variant

    def set_variant(self, name: str) -> "ThreeStageDiT":
        """Compute with the sub-network ``name`` (e.g. ``"tiny"``, ``"small"``, ``"full"``) from now on."""
        if name not in self.variants:
            raise ValueError(f"unknown variant {name!r}; this model serves {sorted(self.variants)}"
                             + ("" if self.config.elastic_variants else
                                " (it is not an elastic supernetwork: train one with an elastic config)"))
        spec = None if name == "full" else WidthSpec(name, self.variants[name])
        for m in self.modules():
            if isinstance(m, ElasticModule):
                m.active = spec
        self._variant = name
        return self

    def stages(self, latent_hw: tuple[int, int]) -> list[dict]:
        """Per-stage summary for a latent of size ``latent_hw``."""
        cfg = self.config
        check_latent_size(*latent_hw, cfg.downsample, cfg.vae_factor)
        gh, gw = latent_hw[0] // cfg.patch_size, latent_hw[1] // cfg.patch_size
        outer = "assa" if cfg.outer_attention == "assa" else "dense"
        return [
            {"name": "down", "blocks": cfg.depths[0], "grid": [gh, gw], "tokens": gh * gw, "attention": outer},
            {"name": "middle", "blocks": cfg.depths[1], "grid": [gh // 2, gw // 2], "tokens": gh * gw // 4,
             "attention": "dense"},
            {"name": "up", "blocks": cfg.depths[2], "grid": [gh, gw], "tokens": gh * gw, "attention": outer},
        ]
