"""Elastic width (SnapGen++ Sec. 3.2): one weight-sharing supernetwork whose width-sliced sub-networks
(tiny 0.375x, small 0.5x, full 1x by default) are trained together and extracted as standalone models.

* :mod:`snapgen.elastic.ops` -- the sliced layers (``ElasticLinear``, ``ElasticConv2d``) and ``WidthSpec``.
* :mod:`snapgen.elastic.supernet` -- ``make_elastic``, ``extract_variant``, ``variant_table``.
* :mod:`snapgen.elastic.training` -- sandwich sub-network sampling and the elastic flow loss
  (flow matching for every width + self-distillation of each sub-network toward the full one).

A model becomes elastic through its config (``ThreeStageDiTConfig.elastic_variants``); select a
sub-network with ``model.set_variant("small")``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WidthSpec": "ops", "ElasticLinear": "ops", "ElasticConv2d": "ops", "ElasticModule": "ops",
    "DEFAULT_VARIANTS": "supernet", "make_elastic": "supernet", "repeat_kv_heads": "supernet", "extract_variant": "supernet",
    "variant_parameters": "supernet", "using_variant": "supernet",
    "sample_subnetworks": "training", "ElasticFlowLoss": "training", "WidthWeights": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy: snapgen.models imports snapgen.elastic.ops, and supernet imports models
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
