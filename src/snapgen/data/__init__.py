"""Data sources: procedural compositional scenes, OpenMoji emoji, your own captioned folders, mixtures."""

from .base import Sample, center_crop_resize, image_to_tensor, tensor_to_image

__all__ = ["Sample", "center_crop_resize", "image_to_tensor", "tensor_to_image"]
