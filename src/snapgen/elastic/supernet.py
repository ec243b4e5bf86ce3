"""The supernetwork side of elastic width: selecting, extracting and creating sub-networks.

Extraction is *exact* by construction: every elastic module reports, through ``active_parameters(spec)``,
the tensors its forward pass uses at that width, under the names a standalone model of that width has.
:func:`variant_parameters` collects them and copies every other (width-independent) tensor unchanged; a
standalone ``ThreeStageDiT`` built from ``config.variant_config(name)`` then loads them strictly.
"""

from __future__ import annotations

import contextlib

import torch

from ..models import ThreeStageDiT  # type hints; every function builds type(model)
from ..nn.elastic import ElasticModule, WidthSpec
from .importance import sort_by_importance

__all__ = ["DEFAULT_VARIANTS", "make_elastic", "repeat_kv_heads", "variant_parameters", "extract_variant", "using_variant"]

DEFAULT_VARIANTS = (("tiny", 0.375), ("small", 0.5))  # SnapGen++: 0.3B / 0.4B / 1.6B at 0.375x / 0.5x / 1x


@contextlib.contextmanager
def using_variant(model: ThreeStageDiT, name: str):
    """Temporarily compute with sub-network ``name``; restores the previous variant afterwards."""
    previous = model.variant
    model.set_variant(name)
    try:
        yield model
    finally:
        model.set_variant(previous)


def variant_parameters(model: ThreeStageDiT, name: str) -> dict[str, torch.Tensor]:
    """The state dict of sub-network ``name`` as a standalone model (tensors are views of the supernet's)."""
    if name not in model.variants:
        raise ValueError(f"unknown variant {name!r}; this model serves {sorted(model.variants)}")
    spec = None if name == "full" else WidthSpec(name, model.variants[name])
    with torch.device("meta"):
        target = type(model)(model.config.variant_config(name))
    wanted = target.state_dict()
    resolved: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ElasticModule):
            for local, tensor in module.active_parameters(spec).items():
                # parents are listed before their children: a module that reports a child's tensor (per-width
                # modulation: the sub-network's own copy) takes precedence over that child's slicing rule
                resolved.setdefault(f"{prefix}.{local}" if prefix else local, tensor)
    full_state = model.state_dict()
    out = {}
    for key, ref in wanted.items():
        src = resolved.get(key, full_state.get(key))
        if src is None:
            raise KeyError(f"extraction found no source for {key}: the supernet and the standalone "
                           f"architecture disagree (a layer that is not width-elastic?)")
        if tuple(src.shape) != tuple(ref.shape):
            raise ValueError(f"extraction of {name!r}: {key} has shape {tuple(src.shape)} in the supernet "
                             f"but {tuple(ref.shape)} in the standalone model (a layer missing its slicing rule)")
        out[key] = src
    return out


@torch.no_grad()
def extract_variant(model: ThreeStageDiT, name: str) -> ThreeStageDiT:
    """A standalone ``ThreeStageDiT`` holding only sub-network ``name``'s weights (copies, same dtype/device)."""
    state = variant_parameters(model, name)
    ref = next(model.parameters())
    sub = type(model)(model.config.variant_config(name)).to(device=ref.device, dtype=ref.dtype)
    sub.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    sub.gradient_checkpointing = model.gradient_checkpointing
    return sub.train(model.training)


@torch.no_grad()
def make_elastic(model: ThreeStageDiT, variants=DEFAULT_VARIANTS, sort: bool = False,
                 modulation: str = "shared") -> ThreeStageDiT:
    """An elastic supernetwork initialised from an ordinary (full-width) model: shared weights copied, each
    variant's own tables/norms initialised from the full model's (sliced) ones. Every variant of the result
    starts as the leading-channel slice of ``model``; elastic training then teaches the slices to work alone.

    ``sort=True`` first re-orders ``model``'s channels and heads by weight importance
    (:func:`snapgen.elastic.importance.sort_by_importance`, once-for-all style; the same full-width function),
    so that the leading slices -- the sub-networks -- start from the most important channels.

    ``modulation`` is the result's ``elastic_modulation``: ``"per_width"`` gives every variant its own
    timestep MLP and adaLN-single map, initialised as the full model's leading slice (so every width still
    starts exactly as with ``"shared"``).
    """
    if model.config.elastic_variants:
        raise ValueError("model is already elastic")
    if sort:
        model = sort_by_importance(model)
    cfg = model.config.replace(elastic_variants=tuple(variants), elastic_modulation=modulation)
    ref = next(model.parameters())
    sup = type(model)(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = sup.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("_variants." not in k for k in missing):
        raise RuntimeError(f"cannot map weights: missing {missing}, unexpected {unexpected}")
    for module in sup.modules():
        for name, table in getattr(module, "modulation_variants", {}).items():  # (chunks, width) tables
            table.copy_(module.modulation[:, :table.shape[1]])
        for pair in getattr(module, "qk_norm_variants", {}).values():  # head_dim-wide: copied whole
            pair["norm_q"].load_state_dict(module.norm_q.state_dict())
            pair["norm_k"].load_state_dict(module.norm_k.state_dict())
        if hasattr(module, "copy_full_to_variants_"):  # per-width timestep MLP / adaLN map: the full's slice
            module.copy_full_to_variants_()
    return sup


@torch.no_grad()
def repeat_kv_heads(model: ThreeStageDiT, kv_heads: int) -> ThreeStageDiT:
    """An equivalent model with more self-attention key/value heads (GQA -> fewer query heads per KV head).

    GQA lets query head ``i`` read KV head ``i // group``; duplicating each KV head ``group_old/group_new``
    times in place (k/v projections and ASSA's per-channel compression) computes exactly the same function.
    Used to warm-start an elastic supernetwork whose narrow variants need whole KV groups (e.g. ``micro``'s
    4 KV heads for 8 query heads cannot slice to 0.375x = 3 query heads; 8 KV heads can)."""
    cfg = model.config
    if kv_heads == cfg.kv_heads:
        return model
    if kv_heads % cfg.kv_heads or cfg.heads % kv_heads:
        raise ValueError(f"kv_heads {kv_heads} must be a multiple of the model's {cfg.kv_heads} and divide its "
                         f"{cfg.heads} query heads")
    rep = kv_heads // cfg.kv_heads
    state = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        is_self_kv = (len(parts) >= 3 and parts[-3] == "attn"
                      and parts[-2] in ("to_k", "to_v", "compress_k", "compress_v"))
        if is_self_kv:
            t = t.reshape(cfg.kv_heads, cfg.head_dim, *t.shape[1:]).repeat_interleave(rep, dim=0)
            t = t.reshape(kv_heads * cfg.head_dim, *t.shape[2:])
        state[key] = t.clone()
    ref = next(model.parameters())
    out = type(model)(cfg.replace(kv_heads=kv_heads)).to(device=ref.device, dtype=ref.dtype)
    out.load_state_dict(state, strict=True)
    return out
