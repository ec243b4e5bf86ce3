"""Evaluation: SceneEval, GenEval's protocol on the procedural scene world, and its detector.

* :mod:`snapgen.eval.detector` -- :class:`SceneDetector` (segment, then classify shapes with a tiny
  CNN), ``load_detector()`` for the shipped weights, ``train_detector()`` to reproduce them.
* :mod:`snapgen.eval.sceneeval` -- GenEval's metadata format and scoring rules, the shipped prompt sets,
  ``evaluate_images``, ``summarize`` and failure grids.

Names are imported lazily (PEP 562), so ``import snapgen.eval`` stays cheap and
``python -m snapgen.eval.detector`` runs cleanly.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "detector": ("DetectedObject", "DetectorConfig", "SceneDetector", "default_detector_dir", "degrade_image",
                 "load_detector", "train_detector"),
    "sceneeval": ("MIN_CONFIDENCE", "POSITION_THRESHOLD", "PROMPT_SETS", "Verdict", "evaluate_images",
                  "load_prompts", "metadata_from_scene", "prompt_path", "relative_position", "save_prompts",
                  "score_image", "summarize", "validate_metadata", "write_failure_grids"),
    "alignment": ("ImageEncoder", "ImageEncoderConfig", "alignment_score", "load_image_encoder",
                  "train_image_encoder", "default_image_encoder_dir"),
    "frechet": ("frechet_distance", "fd_images"),
    "run": ("run_evaluation",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
