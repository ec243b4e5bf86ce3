"""Evaluation: SceneEval, GenEval's protocol on the procedural scene world, and its detector.

* :mod:`snapgen.eval.detector` -- :class:`SceneDetector` (segment, then classify shapes with a tiny
  CNN), ``load_detector()`` for the shipped weights, ``train_detector()`` to reproduce them.
* :mod:`snapgen.eval.sceneeval` -- GenEval's metadata format and scoring rules, the shipped prompt sets,
  ``evaluate_images``, ``summarize`` and failure grids.
* :mod:`snapgen.eval.headline` / :mod:`snapgen.eval.training_captions` -- the headline prompt set (no training
  caption of the shipped recipe in it) and the training captions it is checked against.
* :mod:`snapgen.eval.stats` -- prompt-clustered bootstrap intervals and paired comparisons (McNemar).
* :mod:`snapgen.eval.run` / :mod:`snapgen.eval.geneval_layout` -- ``snapgen eval`` (generate, score, compare)
  and GenEval's image-folder layout both ways.

Names are imported lazily (PEP 562), so ``import snapgen.eval`` stays cheap and
``python -m snapgen.eval.detector`` runs cleanly.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "detector": ("DetectedObject", "DetectorConfig", "SceneDetector", "default_detector_dir", "degrade_image",
                 "load_detector", "load_detector_card", "train_detector"),
    "sceneeval": ("COUNTING_CONFIDENCE", "MIN_CONFIDENCE", "POSITION_THRESHOLD", "PROMPT_SETS", "Verdict", "evaluate_images",
                  "load_prompts", "metadata_from_scene", "prompt_path", "relative_position", "save_prompts",
                  "score_image", "summarize", "validate_metadata", "write_failure_grids"),
    "alignment": ("ImageEncoder", "ImageEncoderConfig", "alignment_score", "load_image_encoder",
                  "train_image_encoder", "default_image_encoder_dir"),
    "frechet": ("frechet_distance", "fd_images"),
    "run": ("run_evaluation", "evaluate_folder", "compare_runs", "score_images"),
    "stats": ("bootstrap_scores", "paired_comparison", "mcnemar_exact", "score_table"),
    "geneval_layout": ("read_layout", "write_layout"),
    "headline": ("HEADLINE_SET", "IN_DISTRIBUTION_SET"),
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
