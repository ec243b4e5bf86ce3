"""Flow objectives by name (``flow.objective`` in a config): ``fm`` (plain flow matching, SnapGen++ Sec. 3.1) and
``dfm`` (Decomposable Flow Matching over the model's pyramid levels, :mod:`snapgen.flow.dfm`). Elastic-width
training (:class:`snapgen.elastic.training.ElasticFlowLoss`) wraps either through their ``draw`` / ``noised`` /
``error`` steps."""

from __future__ import annotations

from .dfm import PAPER_EARLIER_LOGIT_MEAN, DecomposableFlowLoss
from .objective import FlowMatchingLoss

__all__ = ["FLOW_KEYS", "OBJECTIVES", "build_objective"]

OBJECTIVES = {"fm": FlowMatchingLoss, "dfm": DecomposableFlowLoss}
FLOW_KEYS = {"objective", "logit_mean", "logit_std", "shift", "stage_probs", "earlier_logit_mean",
             "earlier_logit_std"}
_DFM_ONLY = ("stage_probs", "earlier_logit_mean", "earlier_logit_std")


def build_objective(flow: dict, model_config) -> FlowMatchingLoss:
    """The objective a config's ``flow:`` section describes, for a model of ``model_config``."""
    kind = flow.get("objective", "fm")
    if kind not in OBJECTIVES:
        raise ValueError(f"flow.objective must be one of {sorted(OBJECTIVES)}, got {kind!r}")
    levels = int(getattr(model_config, "dfm_levels", 1))
    common = {"mean": float(flow.get("logit_mean", 0.0)), "std": float(flow.get("logit_std", 1.0)),
              "shift": float(flow.get("shift", 1.0)), "patch_size": model_config.patch_size}
    if kind == "fm":
        if levels > 1:
            raise ValueError(f"the model has dfm_levels {levels} (a DFM model): set flow.objective: dfm, or "
                             f"model.dfm_levels: 1 for plain flow matching")
        extra = [k for k in _DFM_ONLY if k in flow]
        if extra:
            raise ValueError(f"flow.{extra[0]} is a setting of flow.objective: dfm (this run is plain flow matching)")
        return FlowMatchingLoss(**common)
    return DecomposableFlowLoss(levels=levels, stage_probs=flow.get("stage_probs"),
                                earlier_logit_mean=float(flow.get("earlier_logit_mean", PAPER_EARLIER_LOGIT_MEAN)),
                                earlier_logit_std=float(flow.get("earlier_logit_std", 1.0)), **common)
