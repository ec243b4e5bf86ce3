"""Data sources: procedural compositional scenes, OpenMoji emoji, your own captioned folders, mixtures.

Every source is a map-style ``torch.utils.data.Dataset`` of :class:`Sample` (PIL image, caption, meta);
``build_dataset(spec)`` builds any of them from a config dict.
"""

from .base import Sample, center_crop_resize, image_to_tensor, tensor_to_image
from .emoji import EmojiDataset
from .folder import ImageFolderDataset
from .mixed import MixedDataset, build_dataset
from .scenes import HELDOUT_PAIRS, SceneDataset

__all__ = ["Sample", "center_crop_resize", "image_to_tensor", "tensor_to_image", "EmojiDataset",
           "ImageFolderDataset", "MixedDataset", "build_dataset", "SceneDataset", "HELDOUT_PAIRS"]
