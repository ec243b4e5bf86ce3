"""Importance-sorted warm start of an elastic supernetwork (SnapGen++ Sec. 3.2; once-for-all channel sorting).

SnapGen++ (arXiv 2601.08303, Sec. 3.2) builds its elastic supernetwork from a trained model, and every
sub-network computes with the *leading* slice of each elastic axis (:mod:`snapgen.nn.elastic`). In a trained
dense model that leading slice is arbitrary. Once-for-all (Cai et al., ICLR 2020, arXiv 1908.09791, Sec. 3.2
"elastic width", Fig. 3) re-organises channels before shrinking width: each channel's importance is the L1
norm of its weights, channels are sorted by it, and the narrow sub-networks keep the most important ones.
:func:`sort_by_importance` does that for a dense :class:`~snapgen.models.ThreeStageDiT`: it returns a model
computing the **same function** (exact up to float rounding) whose channels are permuted, most important
first, on every axis that elastic slicing cuts.

Axes and what moves with them (``Use`` = one axis of one tensor; ``chunks`` fused blocks, ``block`` entries
per unit):

* ``residual`` -- the model width ``D``. Written by the patch embedding, the timestep MLP's output (``t_emb``
  is added to the final layer's modulation channel by channel), every attention ``to_out`` / FFN ``fc2`` /
  token merge / token split / skip fusion output; read by every ``to_q``/``to_k``/``to_v``/ASSA gate/``fc1``,
  adaLN ``Linear(D, 9D)`` (input, and its output as 9 chunks), the merge ``Linear(4D, D)`` input (4 chunks),
  the split ``Linear(D, 4D)`` output (4 chunks), skip fusions ``Linear(2D, D)`` (2 chunks), the per-block
  ``(9, D)`` and final ``(2, D)`` modulation tables and the final Linear's input. The block LayerNorms have no
  affine and normalise over the channel axis (permutation-invariant statistics), modulation and gated adds are
  per channel, and the 2x2 reshapes keep channels innermost: nothing on the stream mixes channels by position,
  so one permutation of ``D`` applied to all of these is exact.
* ``time_hidden`` -- the timestep MLP's hidden width (``mlp.0`` rows, ``mlp.2`` columns).
* ``<block>.mlp.hidden`` -- FFN hidden units (``fc1`` rows + bias, ``fc2`` columns).
* ``<block>.cross_attn.heads`` -- whole heads (``head_dim`` rows of q/k/v + biases, columns of ``to_out``).
* ``<block>.attn.kv_heads`` and ``<block>.attn.heads`` -- GQA: query head ``i`` reads KV head ``i // group``.
  KV heads are sorted as groups (k/v rows, ASSA's depthwise compression channels) and each group's query
  heads move with it (q rows, ``to_out`` columns, ASSA gate rows); inside a group the query heads are sorted
  too -- harmless, since a sub-network always keeps whole groups (``ratio * heads = ratio * kv_heads * group``).
  Nothing is permuted inside ``head_dim``: RoPE pairs and the per-head QK-norm act there.

Untouched: the text-side LayerNorm (text width), the QK-norms (``head_dim``, shared by all heads), the
cross-attention k/v input (text width) and the final Linear's output (latent patch values).

Importance (from weights only; ties keep the original order, so untrained zero tensors stay put):

* FFN hidden unit / time hidden unit: L1 norm of the next layer's input column (``fc2[:, j]``, ``mlp.2[:, j]``),
  as once-for-all does.
* attention head: L1 norm of its ``head_dim`` columns of ``to_out``; a GQA group: the sum over its query heads.
* residual channel: every tensor that reads or writes the stream gives a per-channel L1 norm along its ``D``
  axis (summed over chunks); each is divided by its mean over channels (so big layers do not drown the rest;
  all-zero tensors are skipped) and the results are summed.

A parameter the plan does not know (a new layer) is an error rather than silently left unpermuted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import ThreeStageDiT

__all__ = ["Use", "Axis", "importance_plan", "channel_importance", "importance_permutations", "permute_channels",
           "sort_by_importance"]

RESIDUAL, TIME_HIDDEN = "residual", "time_hidden"
UNTOUCHED = ("text_norm.", "final_layer.linear.bias")  # plus every QK-norm (checked by suffix below)
UNTOUCHED_SUFFIXES = (".norm_q.", ".norm_k.")  # and DFM's per-level heads' output biases (below)


@dataclass(frozen=True)
class Use:
    """Axis ``dim`` of parameter ``param`` viewed as ``(chunks, units, block)``; a permutation moves units."""

    param: str
    dim: int
    chunks: int = 1
    block: int = 1


@dataclass
class Axis:
    """One permutable axis: its number of units, the tensors it touches, the ones that score importance, and
    (attention query heads) the GQA group size tying it to a KV axis."""

    size: int
    uses: list[Use] = field(default_factory=list)
    score: list[Use] = field(default_factory=list)
    kv_axis: str | None = None
    group: int = 1


def _view(t: torch.Tensor, use: Use) -> tuple[torch.Tensor, int]:
    shape = list(t.shape)
    units = shape[use.dim] // (use.chunks * use.block)
    if units * use.chunks * use.block != shape[use.dim]:
        raise ValueError(f"{use.param}: axis {use.dim} of size {shape[use.dim]} does not split into "
                         f"{use.chunks} chunks of units of {use.block}")
    return t.reshape(shape[:use.dim] + [use.chunks, units, use.block] + shape[use.dim + 1:]), use.dim + 1


def _unit_l1(t: torch.Tensor, use: Use) -> torch.Tensor:
    v, d = _view(t.detach().abs().double(), use)
    return v.movedim(d, 0).reshape(v.shape[d], -1).sum(1)


def _permute(t: torch.Tensor, use: Use, perm: torch.Tensor) -> torch.Tensor:
    v, d = _view(t, use)
    return v.index_select(d, perm.to(t.device)).reshape(t.shape)


class _Planner:
    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.axes: dict[str, Axis] = {}
        self.lora = {n.rsplit(".lora.", 1)[0] for n in self.params if ".lora." in n}
        self.lora_names = {n for n in self.params if ".lora." in n}

    def axis(self, name: str, size: int) -> Axis:
        if name not in self.axes:
            self.axes[name] = Axis(size)
        return self.axes[name]

    def use(self, axis: str, size: int, param: str, dim: int, chunks: int = 1, block: int = 1,
            score: bool = False) -> None:
        if param not in self.params:
            raise KeyError(f"importance plan: the model has no parameter {param}")
        a, u = self.axis(axis, size), Use(param, dim, chunks, block)
        a.uses.append(u)
        if score:
            a.score.append(u)

    def linear(self, prefix: str, out: tuple | None = None, inp: tuple | None = None) -> None:
        """``out`` / ``inp``: ``(axis, size, chunks, block, score)`` of the rows / columns (None = fixed)."""
        bias = f"{prefix}.bias" in self.params
        adapters = sorted(n for n in self.lora_names if n.startswith(prefix + ".lora."))
        if out is not None:
            axis, size, chunks, block, score = out
            self.use(axis, size, f"{prefix}.weight", 0, chunks, block, score)
            if bias:
                self.use(axis, size, f"{prefix}.bias", 0, chunks, block, score)
            for n in adapters:
                if n.endswith(".B"):
                    self.use(axis, size, n, 0, chunks, block)
        if inp is not None:
            axis, size, chunks, block, score = inp
            self.use(axis, size, f"{prefix}.weight", 1, chunks, block, score)
            for n in adapters:
                if n.endswith(".A"):
                    self.use(axis, size, n, 1, chunks, block)


def importance_plan(model: ThreeStageDiT) -> dict[str, Axis]:
    """Every permutable axis of a dense ``ThreeStageDiT`` and the tensors it touches (see the module doc)."""
    if not isinstance(model, ThreeStageDiT):
        raise TypeError(f"importance sorting supports ThreeStageDiT, got {type(model).__name__}")
    cfg = model.config
    if cfg.elastic_variants:
        raise ValueError("sort_by_importance works on an ordinary (dense) model; sort before make_elastic "
                         "(make_elastic(model, variants, sort=True))")
    D, hd = cfg.width, cfg.head_dim
    P = _Planner(model)
    R = lambda chunks=1: (RESIDUAL, D, chunks, 1, True)  # noqa: E731

    P.use(RESIDUAL, D, "patch_embed.weight", 0, score=True)
    P.use(RESIDUAL, D, "patch_embed.bias", 0, score=True)
    P.linear("t_embedder.mlp.0", out=(TIME_HIDDEN, D, 1, 1, False))
    P.linear("t_embedder.mlp.2", out=R(), inp=(TIME_HIDDEN, D, 1, 1, True))
    P.linear("t_block.1", out=R(9), inp=R())

    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    blocks += [(f"middle_blocks.{i}", b) for i, b in enumerate(model.middle_blocks)]
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    for name, blk in blocks:
        P.use(RESIDUAL, D, f"{name}.modulation", 1, score=True)
        # self-attention: KV groups, and query heads tied to them
        a, heads, kv = f"{name}.attn", blk.attn.heads, blk.attn.kv_heads
        q_axis, kv_axis = f"{a}.heads", f"{a}.kv_heads"
        P.linear(f"{a}.to_q", out=(q_axis, heads, 1, hd, False), inp=R())
        for proj in ("to_k", "to_v"):
            P.linear(f"{a}.{proj}", out=(kv_axis, kv, 1, hd, False), inp=R())
        P.linear(f"{a}.to_out", out=R(), inp=(q_axis, heads, 1, hd, True))
        if hasattr(blk.attn, "compress_k"):  # ASSA: depthwise compression per KV channel, gate per query head
            for conv in ("compress_k", "compress_v"):
                P.use(kv_axis, kv, f"{a}.{conv}.weight", 0, block=hd)
                P.use(kv_axis, kv, f"{a}.{conv}.bias", 0, block=hd)
            P.linear(f"{a}.gate", out=(q_axis, heads, 1, 1, False), inp=R())
        P.axes[q_axis].kv_axis, P.axes[q_axis].group = kv_axis, heads // kv
        # cross-attention: heads (no GQA), k/v read the text width
        c, ch = f"{name}.cross_attn", blk.cross_attn.heads
        P.linear(f"{c}.to_q", out=(f"{c}.heads", ch, 1, hd, False), inp=R())
        for proj in ("to_k", "to_v"):
            P.linear(f"{c}.{proj}", out=(f"{c}.heads", ch, 1, hd, False))
        P.linear(f"{c}.to_out", out=R(), inp=(f"{c}.heads", ch, 1, hd, True))
        # FFN hidden units
        hidden = blk.mlp.fc1.out_features
        P.linear(f"{name}.mlp.fc1", out=(f"{name}.mlp.hidden", hidden, 1, 1, False), inp=R())
        P.linear(f"{name}.mlp.fc2", out=R(), inp=(f"{name}.mlp.hidden", hidden, 1, 1, True))

    P.linear("downsample.proj", out=R(), inp=R(4))
    P.linear("upsample.proj", out=R(4), inp=R())
    skips = [f"middle_skips.{i}" for i in range(len(model.middle_skips))]
    skips += ["stage_skip"] if model.stage_skip is not None else []
    for s in skips:
        P.linear(f"{s}.proj", out=R(), inp=R(2))
    P.use(RESIDUAL, D, "final_layer.modulation", 1, score=True)
    P.linear("final_layer.linear", inp=R())
    if model.dfm is not None:  # DFM's coarser levels: embeddings and heads on the stream, own time hidden axes
        for s in range(len(model.dfm.embeds)):
            P.use(RESIDUAL, D, f"dfm.embeds.{s}.weight", 0, score=True)
            P.use(RESIDUAL, D, f"dfm.embeds.{s}.bias", 0, score=True)
            hidden = f"dfm.t_embedders.{s}.hidden"
            P.linear(f"dfm.t_embedders.{s}.mlp.0", out=(hidden, D, 1, 1, False))
            P.linear(f"dfm.t_embedders.{s}.mlp.2", out=R(), inp=(hidden, D, 1, 1, True))
            P.use(RESIDUAL, D, f"dfm.heads.{s}.modulation", 1, score=True)
            P.linear(f"dfm.heads.{s}.linear", inp=R())

    covered = {u.param for ax in P.axes.values() for u in ax.uses}
    unknown = [n for n in P.params if n not in covered and not n.startswith(UNTOUCHED)
               and not any(s in n for s in UNTOUCHED_SUFFIXES)
               and not (n.startswith("dfm.heads.") and n.endswith(".linear.bias"))]
    if unknown:
        raise RuntimeError(f"importance plan does not know how to permute {unknown}: add them to "
                           f"snapgen.elastic.importance.importance_plan (or to UNTOUCHED if no elastic axis)")
    return P.axes


@torch.no_grad()
def channel_importance(model: ThreeStageDiT, plan: dict[str, Axis] | None = None) -> dict[str, torch.Tensor]:
    """Per-unit importance (float64, larger = more important) of every axis of :func:`importance_plan`."""
    plan = importance_plan(model) if plan is None else plan
    params = dict(model.named_parameters())
    out = {}
    for name, axis in plan.items():
        if axis.kv_axis is not None or not axis.score:
            continue
        parts = [_unit_l1(params[u.param], u) for u in axis.score]
        if name == RESIDUAL:  # normalised per tensor, then summed
            parts = [p / p.mean() for p in parts if p.mean() > 0]
        out[name] = torch.stack(parts).sum(0) if parts else torch.zeros(axis.size, dtype=torch.float64)
    for name, axis in plan.items():  # query heads, then their KV groups
        if axis.kv_axis is not None:
            q = torch.stack([_unit_l1(params[u.param], u) for u in axis.score]).sum(0)
            out[name] = q
            out[axis.kv_axis] = q.reshape(-1, axis.group).sum(1)
    return out


def _descending(score: torch.Tensor) -> torch.Tensor:
    return torch.argsort(score, descending=True, stable=True)


@torch.no_grad()
def importance_permutations(model: ThreeStageDiT) -> dict[str, torch.Tensor]:
    """``{axis: perm}``: new unit ``i`` of each axis is old unit ``perm[i]``, most important first."""
    plan = importance_plan(model)
    scores = channel_importance(model, plan)
    perms = {name: _descending(scores[name]) for name, axis in plan.items() if axis.kv_axis is None}
    for name, axis in plan.items():
        if axis.kv_axis is not None:  # each KV group's query heads follow it, sorted inside the group
            g, q = axis.group, scores[name].reshape(-1, axis.group)
            perms[name] = torch.cat([kv * g + _descending(q[kv]) for kv in perms[axis.kv_axis].tolist()])
    return perms


@torch.no_grad()
def permute_channels(model: ThreeStageDiT, perms: dict[str, torch.Tensor]) -> ThreeStageDiT:
    """A copy of ``model`` with the given axes permuted (axes not in ``perms`` stay as they are). Query-head
    permutations must keep GQA groups with their KV heads: ``perm_q[i] // group == perm_kv[i // group]``."""
    plan = importance_plan(model)
    for name, perm in perms.items():
        if name not in plan:
            raise KeyError(f"unknown axis {name!r}; the model's axes are {sorted(plan)}")
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(plan[name].size)):
            raise ValueError(f"{name}: not a permutation of {plan[name].size} units")
    for name, axis in plan.items():
        if axis.kv_axis is None:
            continue
        g, heads = axis.group, axis.size
        q = torch.as_tensor(perms.get(name, torch.arange(heads)), dtype=torch.long)
        kv = torch.as_tensor(perms.get(axis.kv_axis, torch.arange(heads // g)), dtype=torch.long)
        if not torch.equal(q // g, kv.repeat_interleave(g)):
            raise ValueError(f"{name}: query heads must move with their GQA group (group {g}); permute "
                             f"{axis.kv_axis} and keep each group's heads together")
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    new = {n: p.detach().clone() for n, p in params.items()}
    for name, perm in perms.items():
        for u in plan[name].uses:
            new[u.param] = _permute(new[u.param], u, torch.as_tensor(perm, dtype=torch.long))
    for n, p in params.items():
        p.copy_(new[n])
    return out


@torch.no_grad()
def sort_by_importance(model: ThreeStageDiT, *, return_permutations: bool = False):
    """A copy of dense ``model`` computing the same function, channels of every elastic axis sorted by
    importance (most important first), so that leading-slice sub-networks keep the important ones.
    ``return_permutations=True`` returns ``(model, perms)`` (see :func:`importance_permutations`)."""
    perms = importance_permutations(model)
    out = permute_channels(model, perms)
    return (out, perms) if return_permutations else out
