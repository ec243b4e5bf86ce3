"""Model families: the SnapGen++ three-stage DiT and the isotropic baseline used in its ablation."""

from .config import PAPER_PARAMS, PRESETS, WIDTH_RATIOS, ThreeStageDiTConfig, preset
from .dit import ThreeStageDiT
from .isotropic import IsotropicDiT

__all__ = ["ThreeStageDiT", "ThreeStageDiTConfig", "IsotropicDiT", "PRESETS", "PAPER_PARAMS", "WIDTH_RATIOS",
           "preset"]
