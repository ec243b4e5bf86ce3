"""snapgen: SnapGen++ (arXiv 2601.08303) and its family in PyTorch -- compact diffusion transformers with
Adaptive Sparse Self-Attention for text-to-image generation on edge devices.

Conventions (fixed project-wide, see ``docs/conventions.md``): flow time ``t`` in [0, 1] with ``t = 1``
pure noise; ``x_t = (1 - t) x0 + t eps``; the model predicts the velocity ``v = eps - x0``.
"""

from ._version import __version__  # noqa: F401

from .models import PRESETS, ThreeStageDiT, ThreeStageDiTConfig, build_model, load_model  # noqa: E402
from . import compress  # noqa: E402,F401  (registers the quantized-folder loader)


def load_pipeline(directory=None, **kwargs):
    """A pipeline folder (``pipeline.json``): ``TextToImagePipeline.from_pretrained``."""
    from .pipelines import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(directory, **kwargs)


__all__ = ["ThreeStageDiT", "ThreeStageDiTConfig", "PRESETS", "build_model", "load_model", "load_pipeline",
           "__version__"]
