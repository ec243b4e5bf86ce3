"""Elastic width (SnapGen++ Sec. 3.2): one weight-sharing supernetwork whose width-sliced sub-networks
(tiny 0.375x, small 0.5x, full 1x by default) are trained together and extracted as standalone models.

* :mod:`snapgen.nn.elastic` -- the sliced layers (``ElasticLinear``, ``ElasticConv2d``) and ``WidthSpec``
  (re-exported here; ``snapgen.elastic.ops`` is a deprecated alias).
* :mod:`snapgen.elastic.supernet` -- ``make_elastic``, ``extract_variant``, ``variant_table``.
* :mod:`snapgen.elastic.importance` -- ``sort_by_importance``: a dense model's channels sorted by weight
  importance (once-for-all style), the same function, so the leading slices keep the important channels.
* :mod:`snapgen.elastic.training` -- sandwich sub-network sampling and the elastic flow loss
  (flow matching for every width + self-distillation of each sub-network toward the full one).

A model becomes elastic through its config (``ThreeStageDiTConfig.elastic_variants``); select a
sub-network with ``model.set_variant("small")``.
"""

from __future__ import annotations

from ..nn.elastic import ElasticConv2d, ElasticLinear, ElasticModule, WidthSpec
from .importance import sort_by_importance
from .supernet import (DEFAULT_VARIANTS, extract_variant, make_elastic, repeat_kv_heads, using_variant,
                       variant_parameters)
from .training import ElasticFlowLoss, WidthWeights, sample_subnetworks

__all__ = sorted(["WidthSpec", "ElasticLinear", "ElasticConv2d", "ElasticModule", "DEFAULT_VARIANTS", "make_elastic",
                  "repeat_kv_heads", "extract_variant", "variant_parameters", "using_variant", "sample_subnetworks",
                  "ElasticFlowLoss", "WidthWeights", "sort_by_importance"])
