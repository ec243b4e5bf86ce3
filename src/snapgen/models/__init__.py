"""Model families behind one Denoiser interface (:mod:`snapgen.models.base`) and one registry
(:mod:`snapgen.models.registry`): the SnapGen++ three-stage DiT and the isotropic baseline of its ablation.

Adding a family: a new file with ``@register_model("name", config=..., presets=...)`` on the class, one
import line below, and the contract tests (``tests/contracts/denoiser.py``) applied to it.
"""

from .base import AdapterHost, Denoiser, Elastic, text_cond
from .config import PAPER_PARAMS, PRESETS, WIDTH_RATIOS, ThreeStageDiTConfig, preset
from .registry import MODELS, build_model, load_model, model_names, register_folder_loader, resolve_config
from .three_stage_dit import ThreeStageDiT
from .isotropic import IsotropicDiT  # noqa: E402  (registers after three_stage_dit)

__all__ = ["ThreeStageDiT", "ThreeStageDiTConfig", "IsotropicDiT", "PRESETS", "PAPER_PARAMS", "WIDTH_RATIOS",
           "preset", "MODELS", "build_model", "load_model", "model_names", "resolve_config", "register_folder_loader",
           "Denoiser", "Elastic", "AdapterHost", "text_cond"]
