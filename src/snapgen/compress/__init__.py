"""Compression: the paper's k-means weight quantization [SnapGen++ supplementary] (and, later, structured
pruning). Importing this package registers the quantized-folder loader with :func:`snapgen.models.load_model`."""

from . import quantize  # noqa: F401
