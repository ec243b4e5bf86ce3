"""Width-elastic building blocks (once-for-all / slimmable style): layers that hold the full-width weights
and compute with the leading slice selected by the active :class:`WidthSpec`.

One rule decides every slice: a dimension that is elastic keeps its first ``round(n * ratio)`` entries
*per chunk*. A chunk is a block of a fused axis: adaLN's ``Linear(D, 9D)`` output is 9 chunks of ``D``
(shift/scale/gate x 3), the 2x2 token merge's ``Linear(4D, D)`` input is 4 chunks, a skip fusion's
``Linear(2D, D)`` input is 2. Q/K/V are separate projections laid out ``(heads, head_dim)``, so the first
``h * head_dim`` rows *are* the first ``h`` heads; with a constant head size, slicing width slices whole
heads, and with GQA the first ``h`` query heads map onto the first ``h / group`` key/value heads.

The same ``active_parameters(spec)`` function feeds both the forward pass and extraction
(:func:`snapgen.elastic.extract_variant`), so an extracted model computes exactly what the supernet
computed at that width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WidthSpec", "ElasticModule", "ElasticLinear", "ElasticConv2d", "ElasticLayerNorm", "active_size",
           "slice_chunks"]


@dataclass(frozen=True)
class WidthSpec:
    """The active sub-network: its variant ``name`` and width ``ratio`` of the supernet (1.0 = full)."""

    name: str
    ratio: float

    @property
    def is_full(self) -> bool:
        return self.ratio == 1.0


def active_size(n: int, ratio: float, what: str = "dimension") -> int:
    """``n * ratio``, which must be a whole number (configs are validated so that it is)."""
    m = n * ratio
    if abs(m - round(m)) > 1e-6 or round(m) <= 0:
        raise ValueError(f"width ratio {ratio} does not divide the {what} of size {n} into whole units "
                         f"({n} x {ratio} = {m}); choose ratios that keep every sliced size an integer")
    return int(round(m))


def slice_chunks(t: torch.Tensor, dim: int, chunks: int, keep: int) -> torch.Tensor:
    """Keep the first ``keep`` entries of each of ``chunks`` equal blocks along ``dim``."""
    n = t.shape[dim] // chunks
    if keep == n:
        return t
    if chunks == 1:
        return t.narrow(dim, 0, keep)
    shape = list(t.shape)
    view = t.reshape(shape[:dim] + [chunks, n] + shape[dim + 1:]).narrow(dim + 1, 0, keep)
    return view.reshape(shape[:dim] + [chunks * keep] + shape[dim + 1:])


class ElasticModule:
    """Mixin: ``active`` is the current :class:`WidthSpec` (``None`` = full width, the plain layer), set
    for the whole model by ``ThreeStageDiT.set_variant``. ``active_parameters(spec)`` returns this module's
    own parameters as the sub-network at ``spec`` uses them, keyed by the names a standalone model of that
    width has."""

    active: WidthSpec | None = None

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class LoRA(nn.Module):
    """A low-rank update ``scale * B @ A`` of a Linear's weight (``A (rank, in)``, ``B (out, rank)``); ``B``
    starts at zero so a new adapter changes nothing. Sliced with the host layer's width rule."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class ElasticLinear(ElasticModule, nn.Linear):
    """``nn.Linear`` whose input and/or output axis is sliced with the active width (per chunk), with
    optional named LoRA adapters (``add_adapter``; the active one is ``active_adapter``)."""

    active_adapter: str | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, in_chunks: int = 1,
                 out_chunks: int = 1, elastic_in: bool = True, elastic_out: bool = True):
        super().__init__(in_features, out_features, bias)
        if in_features % in_chunks or out_features % out_chunks:
            raise ValueError("features must split evenly into chunks")
        self.in_chunks, self.out_chunks = in_chunks, out_chunks
        self.elastic_in, self.elastic_out = elastic_in, elastic_out

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        w, b = self.weight, self.bias
        if spec is None or spec.is_full:
            return {"weight": w, "bias": b} if b is not None else {"weight": w}
        if self.elastic_out:
            keep = active_size(self.out_features // self.out_chunks, spec.ratio, "output")
            w = slice_chunks(w, 0, self.out_chunks, keep)
            b = slice_chunks(b, 0, self.out_chunks, keep) if b is not None else None
        if self.elastic_in:
            keep = active_size(self.in_features // self.in_chunks, spec.ratio, "input")
            w = slice_chunks(w, 1, self.in_chunks, keep)
        return {"weight": w, "bias": b} if b is not None else {"weight": w}

    # --- LoRA ------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float) -> LoRA:
        if "lora" not in self._modules:
            self.lora = nn.ModuleDict()
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists")
        ref = self.weight
        self.lora[name] = LoRA(self.in_features, self.out_features, rank, alpha).to(ref.device, ref.dtype)
        return self.lora[name]

    def adapter_delta(self, name: str, spec: WidthSpec | None = None) -> torch.Tensor:
        """The adapter's weight update ``scale * B @ A`` at width ``spec``."""
        a, b = self._adapter_factors(self.lora[name], spec)
        return self.lora[name].scale * (b @ a)

    def _adapter_factors(self, lora: LoRA, spec: WidthSpec | None):
        a, b = lora.A, lora.B
        if spec is not None and not spec.is_full:
            if self.elastic_in:
                a = slice_chunks(a, 1, self.in_chunks, active_size(self.in_features // self.in_chunks, spec.ratio))
            if self.elastic_out:
                b = slice_chunks(b, 0, self.out_chunks, active_size(self.out_features // self.out_chunks, spec.ratio))
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.active.is_full:
            y = F.linear(x, self.weight, self.bias)
        else:
            p = self.active_parameters(self.active)
            y = F.linear(x, p["weight"], p.get("bias"))
        if self.active_adapter is not None and "lora" in self._modules and self.active_adapter in self.lora:
            lora = self.lora[self.active_adapter]
            a, b = self._adapter_factors(lora, self.active)
            y = y + lora.scale * F.linear(F.linear(x, a), b)
        return y


class ElasticConv2d(ElasticModule, nn.Conv2d):
    """``nn.Conv2d`` with elastic output channels; for a depthwise conv (``groups == out_channels``) the
    groups shrink with them. The input side of a dense conv stays fixed (the patch embedding reads latents)."""

    def active_parameters(self, spec: WidthSpec | None) -> dict[str, torch.Tensor]:
        w, b = self.weight, self.bias
        if spec is not None and not spec.is_full:
            keep = active_size(self.out_channels, spec.ratio, "channel")
            w, b = w[:keep], (b[:keep] if b is not None else None)
        return {"weight": w, "bias": b} if b is not None else {"weight": w}

    @property
    def depthwise(self) -> bool:
        return self.groups == self.out_channels == self.in_channels and self.groups > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.active.is_full:
            return super().forward(x)
        p = self.active_parameters(self.active)
        groups = p["weight"].shape[0] if self.depthwise else self.groups
        return F.conv2d(x, p["weight"], p.get("bias"), self.stride, self.padding, self.dilation, groups)


class ElasticLayerNorm(nn.LayerNorm):
    """Parameter-free LayerNorm over whatever width its input has (the active width), as DiT blocks use
    before modulation; affine norms would be per-width parameters instead (see the QK-norms)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__(width, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps)
