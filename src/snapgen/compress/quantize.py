"""The paper's weight quantization (SnapGen++ supplementary): per-layer k-means clustering of the weights
(4-bit = 16 centroids for most layers, 8-bit = 256 for the sensitive ones) chosen by a sensitivity analysis
to reach ~4.3 bits on average, then a short self-distillation fine-tune of the unquantized biases and norms.

* :func:`kmeans_1d` -- Lloyd's algorithm on the scalar weights of one tensor (quantile init; assignment by
  ``bucketize`` on the centroid midpoints, exact for 1-D), returning the look-up table and the indices.
* :func:`sensitivity` -- output error of the whole model (velocity MSE on calibration batches, relative to
  the fp32 output) when that layer *alone* is 4-bit.
* calibration inputs: :mod:`snapgen.compress.calibration` (default: the states the pipeline's own sampler
  visits -- a distilled pipeline's 4 step times; ``"uniform"``: re-noised final latents at random times).
* :func:`allocate_bits` -- the most sensitive layers get 8 bits until the parameter-weighted mean reaches
  the target (4.3).
* :func:`quantize_model` -- the whole recipe; :func:`save_quantized` / :func:`load_quantized` store it
  compactly (4-bit indices packed two per byte, fp16 look-up tables, other tensors fp16).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import text_cond
from .calibration import calibration_batches
from ..models.registry import register_folder_loader

__all__ = ["kmeans_1d", "QuantizedTensor", "quantizable_layers", "sensitivity", "allocate_bits", "quantize_model",
           "save_quantized", "load_quantized", "calibration_batches", "QUANT_FORMAT"]

QUANT_FORMAT = "snapgen-kmeans"
MIN_NUMEL = 1024  # tensors smaller than this (biases, norms, tables) stay in fp16: clustering them saves nothing


@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the scalars of ``values`` into ``k`` centroids; returns ``(lut (k,), indices (same shape, int64))``."""
    x = values.detach().flatten().float()
    if x.numel() <= k:
        lut, idx = torch.unique(x, return_inverse=True)
        return torch.cat([lut, lut.new_zeros(k - len(lut))]), idx.view_as(values)
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    lut = torch.quantile(x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:100000]].double(),
                         q).float()
    for _ in range(iters):
        lut, _ = torch.sort(lut)
        idx = torch.bucketize(x, (lut[1:] + lut[:-1]) / 2)
        sums = torch.zeros(k).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).float()
        new = torch.where(counts > 0, sums / counts.clamp_min(1), lut)
        if torch.allclose(new, lut):
            break
        lut = new
    lut, _ = torch.sort(lut)
    idx = torch.bucketize(x, (lut[1:] + lut[:-1]) / 2)
    return lut, idx.view_as(values)


@dataclass
class QuantizedTensor:
    lut: torch.Tensor        # (2**bits,) float
    indices: torch.Tensor    # int64, the tensor's shape
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.lut[self.indices]

    @classmethod
    def from_tensor(cls, w: torch.Tensor, bits: int) -> "QuantizedTensor":
        lut, idx = kmeans_1d(w, 2**bits)
        return cls(lut.half().float(), idx, bits)  # the stored table is fp16: use exactly that

    def packed(self) -> torch.Tensor:
        """Indices as bytes: two per byte at 4 bits, one at 8."""
        flat = self.indices.flatten().to(torch.uint8)
        if self.bits == 8:
            return flat
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return flat[0::2] | (flat[1::2] << 4)

    @staticmethod
    def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        if bits == 8:
            return packed.long()[:n].view(shape)
        out = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()[:n]
        return out.long().view(shape)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight matrices of Linear/Conv layers with at least ``MIN_NUMEL`` entries (what gets clustered)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() >= MIN_NUMEL:
            out[f"{name}.weight"] = m.weight
    return out


def _call(model, batch) -> torch.Tensor:
    """``batch``: ``(x, t, cond)`` or ``(x, t, text, text_mask)`` (what :func:`calibration_batches` yields)."""
    x, t, *c = batch
    cond = c[0] if len(c) == 1 and isinstance(c[0], dict) else text_cond(*c)
    return model(x, t, cond)


def _calibration_output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return _call(model, batch).float()


@torch.no_grad()
def sensitivity(model: nn.Module, batch, bits: int = 4) -> dict[str, float]:
    """Relative output error ``||v_q - v||^2 / ||v||^2`` with only that layer quantized to ``bits``; ``batch``:
    one calibration batch, or a list of them (errors summed over all before dividing)."""
    batches = batch if isinstance(batch, list) else [batch]
    refs = [_calibration_output(model, b) for b in batches]
    denom = max(sum(float(r.pow(2).sum()) for r in refs), 1e-12)
    out = {}
    for name, w in quantizable_layers(model).items():
        saved = w.detach().clone()
        w.copy_(QuantizedTensor.from_tensor(saved, bits).dequantize())
        out[name] = sum(float((_calibration_output(model, b) - r).pow(2).sum()) for b, r in zip(batches, refs)) / denom
        w.copy_(saved)
    return out


def spread(items: list, n: int) -> list:
    """``n`` items evenly spaced through ``items`` (first and last included; all when ``n >= len``)."""
    if n >= len(items):
        return list(items)
    if n <= 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def allocate_bits(sizes: dict[str, int], sens: dict[str, float], target_bits: float = 4.3,
                  low: int = 4, high: int = 8) -> dict[str, int]:
    """``high`` bits for the most sensitive layers while the size-weighted mean stays <= ``target_bits``."""
    if not low <= target_bits <= high:
        raise ValueError(f"target bits {target_bits} must be within [{low}, {high}]")
    bits = {n: low for n in sizes}
    total = sum(sizes.values())
    budget = (target_bits - low) * total  # extra bit-parameters available
    for name in sorted(sens, key=sens.get, reverse=True):
        extra = (high - low) * sizes[name]
        if extra <= budget:
            bits[name] = high
            budget -= extra
    return bits


def mean_bits(sizes: dict[str, int], bits: dict[str, int]) -> float:
    return sum(sizes[n] * bits[n] for n in sizes) / max(1, sum(sizes.values()))


def quantize_model(model: nn.Module, calibration: list[tuple], target_bits: float = 4.3, finetune_steps: int = 100,
                   lr: float = 1e-4, progress=print, sensitivity_batches: int = 1) -> tuple[nn.Module, dict]:
    """Quantize ``model`` in place: sensitivity on ``sensitivity_batches`` calibration batches evenly spread
    through the list (1: ``calibration[0]``; sampler calibration passes one per step time, so every time the
    sampler visits weighs in), bit allocation, k-means per layer, then
    ``finetune_steps`` of self-distillation toward the fp32 outputs on the calibration batches, training only
    the unquantized parameters (biases, norms, modulation tables). Returns the model and a report."""
    import copy

    calibration = [tuple(a.detach() if torch.is_tensor(a) else a for a in b) for b in calibration]
    reference = copy.deepcopy(model).eval()
    model.eval()
    layers = quantizable_layers(model)
    sizes = {n: w.numel() for n, w in layers.items()}
    sens = sensitivity(model, spread(calibration, sensitivity_batches))
    bits = allocate_bits(sizes, sens, target_bits)
    qt = {}
    with torch.no_grad():
        for name, w in layers.items():
            qt[name] = QuantizedTensor.from_tensor(w.detach(), bits[name])
            w.copy_(qt[name].dequantize())
    err_before = _relative_error(model, reference, calibration)
    trainable = [p for n, p in model.named_parameters() if n not in layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    if finetune_steps > 0 and trainable:
        opt = torch.optim.Adam(trainable, lr=lr)
        targets = [_calibration_output(reference, b) for b in calibration]
        for step in range(finetune_steps):
            i = step % len(calibration)
            loss = F.mse_loss(_call(model, calibration[i]).float(), targets[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    err_after = _relative_error(model, reference, calibration)
    report = {"target_bits": target_bits, "mean_bits": round(mean_bits(sizes, bits), 3),
              "layers_8bit": sorted(n for n, b in bits.items() if b == 8), "layers": len(layers),
              "relative_error_before_finetune": err_before, "relative_error": err_after,
              "finetune_steps": finetune_steps}
    model._snapgen_quant = {n: q for n, q in qt.items()}
    progress(f"quantized {len(layers)} layers to {report['mean_bits']} bits on average "
             f"({len(report['layers_8bit'])} at 8 bits); output error {err_before:.2e} -> {err_after:.2e} "
             f"after {finetune_steps} fine-tune steps")
    return model, report


@torch.no_grad()
def _relative_error(model, reference, calibration) -> float:
    num = den = 0.0
    for b in calibration:
        ref = _calibration_output(reference, b)
        num += float((_calibration_output(model, b) - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-12)


def save_quantized(model: nn.Module, directory: str | os.PathLike, report: dict | None = None) -> Path:
    """Write ``config.json`` + ``quantized.safetensors`` (packed indices, fp16 tables, other tensors fp16)."""
    from ..nn.io import atomic_save_safetensors

    qt = getattr(model, "_snapgen_quant", None)
    if not qt:
        raise ValueError("model is not quantized (run quantize_model first)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, layout = {}, {}
    for name, t in model.state_dict().items():
        if ".lora." in name:
            continue
        if name in qt:
            q = qt[name]
            tensors[f"{name}.idx"] = q.packed().contiguous()
            tensors[f"{name}.lut"] = q.lut.half().contiguous()
            layout[name] = {"bits": q.bits, "shape": list(t.shape)}
        else:
            tensors[name] = t.detach().half().contiguous() if t.is_floating_point() else t.contiguous()
    meta = {"format": QUANT_FORMAT, "layout": json.dumps(layout), "report": json.dumps(report or {})}
    atomic_save_safetensors(tensors, d / "quantized.safetensors", metadata=meta)
    model.config.to_json(d / "config.json", class_name=type(model).__name__)  # load_model dispatches on it
    return d


def load_quantized(directory: str | os.PathLike):
    """A ``ThreeStageDiT`` (fp32 compute) from a ``save_quantized`` folder, weights dequantized."""
    from ..models.registry import saved_class
    from ..nn.io import read_safetensors

    d = Path(directory)
    path = d / "quantized.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a quantized model folder holds config.json and "
                                f"quantized.safetensors; create one with `snapgen quantize`)")
    tensors, meta = read_safetensors(path, QUANT_FORMAT, "snapgen k-means quantized file")
    layout = json.loads(meta["layout"])
    cls, config = saved_class(d)
    model = cls(config)
    state = {}
    for name, ref in model.state_dict().items():
        if name in layout:
            spec = layout[name]
            idx = QuantizedTensor.unpack(tensors[f"{name}.idx"], spec["bits"], tuple(spec["shape"]))
            state[name] = tensors[f"{name}.lut"].float()[idx]
        elif name in tensors:
            state[name] = tensors[name].to(ref.dtype)
        else:
            raise ValueError(f"{path} lacks {name}: it was written for another model")
    model.load_state_dict(state, strict=True)
    model._snapgen_quant_report = json.loads(meta.get("report", "{}"))
    return model.eval()


register_folder_loader("quantized.safetensors", load_quantized)
