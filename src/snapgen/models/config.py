"""Model configuration: one frozen dataclass, saved as ``config.json`` beside the safetensors weights.

Presets
-------
``tiny`` / ``small`` / ``full`` are the paper's three variants at width ratios 0.375 / 0.5 / 1 of one
full width (2048). Heads shrink with width at a constant head size (64) and a constant GQA group (2
query heads per key/value head), so ``small`` has the paper's 8 KV heads. Depths (Down / Middle / Up)
are the same for all three. See ``docs/architecture.md`` for why these numbers, and for the parameter
counts beside the paper's 0.3B / 0.4B / 1.6B.

``micro`` and ``nano`` are small configurations for CPU training and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.config import JSONConfigMixin
from ..attention.bna import BNA_BACKENDS

__all__ = ["PAPER_PARAMS", "PRESETS", "WIDTH_RATIOS", "ThreeStageDiTConfig", "preset"]

ATTENTION_KINDS = ("assa", "dense")
ELASTIC_MODULATION = ("shared", "per_width")


@dataclass(frozen=True)
class ThreeStageDiTConfig(JSONConfigMixin):
    _config_kind = "ThreeStageDiT"
    _optional_keys = ("elastic_variants", "elastic_modulation", "dfm_levels")  # configs saved before these existed

    # --- latent interface -------------------------------------------------------------------------------
    in_channels: int = 16            # latent channels (paper: Qwen-Image VAE, 16)
    vae_factor: int = 8              # image pixels per latent pixel (used to report image sizes)
    patch_size: int = 2              # latent patchify
    # --- width ------------------------------------------------------------------------------------------
    width: int = 1024                # hidden size of every stage
    head_dim: int = 64
    kv_heads: int = 8                # GQA key/value heads of the self-attention (query heads = width / head_dim)
    # --- depth: Down (full token grid) / Middle (2x2-downsampled grid) / Up (full grid) -------------------
    depths: tuple[int, int, int] = (6, 9, 8)
    mlp_ratio: float = 4.0           # FFN ratio in Down and Up
    mlp_ratio_middle: float = 3.0    # FFN ratio in Middle
    # --- attention --------------------------------------------------------------------------------------
    outer_attention: str = "assa"    # self-attention of Down/Up: "assa" or "dense" (ablation)
    bna_tile: tuple[int, int] = (4, 0)   # BNA tile in tokens, 0 = whole axis: (4, 0) = 4-row chunks, the
                                         # paper's 16 blocks at 64x64; (8, 8) = 2-D tiles
    bna_radius: int = 1              # neighbour tiles on each side
    bna_backend: str = "auto"        # "auto" (CUDA: compiled flex; CPU: fused kernel where it applies; else
    #                                  gather), "gather" (train + export), "fused", "tiles", "reference",
    #                                  "flex" (CUDA train + inference; CPU inference only)
    rope_theta: float = 10000.0
    # --- text -------------------------------------------------------------------------------------------
    text_dim: int = 2560             # width of the text-encoder features fed to cross-attention
    # --- skips ------------------------------------------------------------------------------------------
    middle_skips: bool = True        # U-ViT long skips inside the Middle stage
    stage_skip: bool = True          # Down -> Up skip
    # --- timestep ---------------------------------------------------------------------------------------
    time_freq_dim: int = 256         # sinusoidal features of 1000 * t
    # --- elastic width (SnapGen++ Sec. 3.2) -----------------------------------------------------------------
    # Sub-networks served by this supernetwork besides "full": ((name, width ratio), ...), e.g.
    # (("tiny", 0.375), ("small", 0.5)). Empty = an ordinary model. A dict is accepted too.
    elastic_variants: tuple[tuple[str, float], ...] = ()
    # The timestep MLP and adaLN-single map of the sub-networks: "shared" = the leading slice of the full
    # model's (the default, and every model saved before this key existed); "per_width" = each sub-network has
    # its own at its own width (the paper keeps modulation layers per width). Needs elastic_variants.
    elastic_modulation: str = "shared"
    # --- Decomposable Flow Matching (DFM, arXiv 2506.19839; snapgen.models.multiscale) ----------------------------
    # Pyramid levels the model denoises together: 1 = plain flow matching; S > 1 = the packed S-level pyramid state
    # with one time per level, one patch embedding / timestep embedder / head per level (patch_size must divide
    # by 2 ** (S - 1): the coarsest level's patch is patch_size / 2 ** (S - 1)).
    dfm_levels: int = 1

    def __post_init__(self):
        # JSON round trips give lists; store tuples so configs compare and hash.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "bna_tile", tuple(int(t) for t in self.bna_tile))
        ev = self.elastic_variants
        ev = ev.items() if isinstance(ev, dict) else ev
        object.__setattr__(self, "elastic_variants", tuple((str(n), float(r)) for n, r in ev))
        self.validate()

    # ----------------------------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def downsample(self) -> int:
        """Latent pixels per Middle-stage token along each axis (patchify x stage downsample)."""
        return self.patch_size * 2

    @property
    def latent_multiple(self) -> int:
        """The Denoiser interface's name for :attr:`downsample`: latent height and width must be multiples."""
        return self.downsample

    @property
    def cond_dims(self) -> dict[str, int]:
        """Feature width of each ``cond`` tensor the model reads (``text_mask`` is a bool mask)."""
        return {"text": self.text_dim}

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid ThreeStageDiTConfig: {msg}")

        for name in ("in_channels", "vae_factor", "patch_size", "width", "head_dim", "kv_heads", "text_dim",
                     "time_freq_dim"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.head_dim:
            bad(f"width ({self.width}) must be a multiple of head_dim ({self.head_dim})")
        if self.head_dim % 4:
            bad(f"head_dim ({self.head_dim}) must be divisible by 4 for 2-D RoPE")
        if self.heads % self.kv_heads:
            bad(f"query heads ({self.heads} = width/head_dim) must be a multiple of kv_heads ({self.kv_heads})")
        if len(self.depths) != 3 or any(d < 0 for d in self.depths) or sum(self.depths) == 0:
            bad(f"depths must be three non-negative block counts (down, middle, up), got {self.depths}")
        if self.outer_attention not in ATTENTION_KINDS:
            bad(f"outer_attention must be one of {ATTENTION_KINDS}, got {self.outer_attention!r}")
        if self.bna_backend not in BNA_BACKENDS:
            bad(f"bna_backend must be one of {', '.join(map(repr, BNA_BACKENDS))}, got {self.bna_backend!r}")
        if len(self.bna_tile) != 2 or min(self.bna_tile) < 0:
            bad(f"bna_tile must be two non-negative ints (0 = whole axis), got {self.bna_tile}")
        if self.bna_radius < 0:
            bad(f"bna_radius must be >= 0, got {self.bna_radius}")
        if self.mlp_ratio <= 0 or self.mlp_ratio_middle <= 0:
            bad("mlp ratios must be positive")
        if isinstance(self.dfm_levels, bool) or not isinstance(self.dfm_levels, int) or self.dfm_levels < 1:
            bad(f"dfm_levels must be an integer >= 1 (1 = plain flow matching), got {self.dfm_levels!r}")
        if self.patch_size % 2 ** (self.dfm_levels - 1):
            bad(f"dfm_levels {self.dfm_levels} needs patch_size divisible by {2 ** (self.dfm_levels - 1)} (every "
                f"pyramid level on one token grid), got patch_size {self.patch_size}")
        if self.elastic_modulation not in ELASTIC_MODULATION:
            bad(f"elastic_modulation must be one of {ELASTIC_MODULATION}, got {self.elastic_modulation!r}")
        if self.elastic_modulation == "per_width" and not self.elastic_variants:
            bad("elastic_modulation 'per_width' needs elastic_variants (an ordinary model has one width)")
        names = [n for n, _ in self.elastic_variants]
        if len(set(names)) != len(names) or "full" in names:
            bad(f"elastic_variants names must be unique and not 'full', got {names}")
        for name, ratio in self.elastic_variants:
            if not name.isidentifier():
                bad(f"elastic variant name {name!r} must be a Python identifier (it names parameters)")
            if not 0 < ratio < 1:
                bad(f"elastic variant {name!r}: width ratio must be in (0, 1), got {ratio}")
            try:
                self.variant_config(name)
            except ValueError as e:
                bad(f"elastic variant {name!r} at ratio {ratio}: {e}")

    def variant_config(self, name: str) -> "ThreeStageDiTConfig":
        """The standalone config of sub-network ``name``: width x ratio, heads shrink at constant head size
        and constant GQA group. Every sliced size must stay whole, and the FFN hidden sizes of the slice must
        equal what a standalone model of that width builds."""
        variants = dict(self.elastic_variants)
        if name == "full":
            return self.replace(elastic_variants=(), elastic_modulation="shared")
        if name not in variants:
            raise ValueError(f"unknown variant {name!r}; known: {sorted(variants) + ['full']}")
        r = variants[name]

        def whole(n, what):
            m = n * r
            if abs(m - round(m)) > 1e-6:
                raise ValueError(f"{what} {n} x {r} = {m} is not whole")
            return int(round(m))

        width = whole(self.width, "width")
        if width % self.head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {self.head_dim}")
        kv_heads = whole(self.kv_heads, "kv_heads")
        for ratio in (self.mlp_ratio, self.mlp_ratio_middle):
            if whole(int(round(self.width * ratio)), "FFN hidden size") != int(round(width * ratio)):
                raise ValueError(f"FFN hidden size does not slice to round({width} x {ratio})")
        return ThreeStageDiTConfig(**{**self.to_dict(), "width": width, "kv_heads": kv_heads,
                                      "elastic_variants": (), "elastic_modulation": "shared"})


# ------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------

FULL_WIDTH = 2048
WIDTH_RATIOS = {"tiny": 0.375, "small": 0.5, "full": 1.0}
PAPER_PARAMS = {"tiny": 0.3e9, "small": 0.4e9, "full": 1.6e9}  # SnapGen++ Table 2 (DiT only)

_PAPER_BASE = dict(in_channels=16, vae_factor=8, patch_size=2, head_dim=64, depths=(6, 9, 8), mlp_ratio=4.0,
                   mlp_ratio_middle=3.0, text_dim=2560)


def _paper_variant(ratio: float) -> ThreeStageDiTConfig:
    width = int(FULL_WIDTH * ratio)
    heads = width // 64
    return ThreeStageDiTConfig(width=width, kv_heads=heads // 2, **_PAPER_BASE)


PRESETS: dict[str, ThreeStageDiTConfig] = {
    **{name: _paper_variant(r) for name, r in WIDTH_RATIOS.items()},
    # The shipped CPU-trained model (8.5M parameters): 64x64 images, a 4-channel factor-4 latent, MiniLM text (384-d).
    "micro": ThreeStageDiTConfig(in_channels=4, vae_factor=4, patch_size=2, width=256, head_dim=32, kv_heads=4,
                                 depths=(2, 3, 2), text_dim=384, bna_tile=(2, 0)),
    # Smallest meaningful elastic supernetwork (GQA group 2 at every width), for tests.
    "nano-elastic": ThreeStageDiTConfig(in_channels=4, vae_factor=8, patch_size=2, width=128, head_dim=8,
                                        kv_heads=8, depths=(1, 2, 1), text_dim=32, bna_tile=(2, 0),
                                        time_freq_dim=32, elastic_variants=(("tiny", 0.375), ("small", 0.5))),
    # The elastic supernetwork of the shipped model: micro with 8 KV heads (GQA group 1), so that tiny (0.375 x 256
    # = 96 = 3 heads of 32) keeps whole KV groups; small = 128 (4 heads). A trained micro converts to it exactly
    # (snapgen.elastic.repeat_kv_heads + make_elastic).
    "micro-elastic": ThreeStageDiTConfig(in_channels=4, vae_factor=4, patch_size=2, width=256, head_dim=32,
                                         kv_heads=8, depths=(2, 3, 2), text_dim=384, bna_tile=(2, 0),
                                         elastic_variants=(("tiny", 0.375), ("small", 0.5))),
    # Smallest meaningful model, for tests.
    "nano": ThreeStageDiTConfig(in_channels=4, vae_factor=8, patch_size=2, width=64, head_dim=16, kv_heads=2,
                                depths=(1, 2, 1), text_dim=32, bna_tile=(2, 0), time_freq_dim=32),
}


def preset(name: str, **overrides) -> ThreeStageDiTConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
