"""snapgen: SnapGen++ (arXiv 2601.08303) in PyTorch -- compact three-stage diffusion transformers with
Adaptive Sparse Self-Attention for text-to-image generation on edge devices.

Conventions (fixed project-wide, see ``docs/conventions.md``): flow time ``t`` in [0, 1] with ``t = 1``
pure noise; ``x_t = (1 - t) x0 + t eps``; the model predicts the velocity ``v = eps - x0``.
"""

__version__ = "0.1.0"

from .models import PRESETS, ThreeStageDiT, ThreeStageDiTConfig  # noqa: E402

__all__ = ["ThreeStageDiT", "ThreeStageDiTConfig", "PRESETS", "__version__"]
