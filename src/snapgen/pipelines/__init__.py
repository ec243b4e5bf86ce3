"""Inference pipelines: prompt in, PIL images out."""

from .text_to_image import PipelineConfig, TextToImagePipeline, default_model_dir

__all__ = ["PipelineConfig", "TextToImagePipeline", "default_model_dir"]
