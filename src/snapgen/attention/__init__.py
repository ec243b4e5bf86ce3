"""Attention for snapgen: a functional core (heads-last tensors), thin modules, and several BNA backends.

See ``docs/architecture.md`` for the ASSA design choices (tile geometry, border rule, gate, compression).
"""

from .backend import backend_report
from .bna import BNA_BACKENDS, TileGeometry, bna_mask, block_neighborhood_attention, make_geometry
from .functional import assa_attention, attention, compress_tokens
from .modules import AdaptiveSparseSelfAttention, CrossAttention, SelfAttention
from .rope import apply_rope, grid_positions, rope_angles

__all__ = [
    "BNA_BACKENDS", "backend_report", "TileGeometry", "bna_mask", "block_neighborhood_attention", "make_geometry",
    "assa_attention", "attention", "compress_tokens",
    "AdaptiveSparseSelfAttention", "CrossAttention", "SelfAttention",
    "apply_rope", "grid_positions", "rope_angles",
]
