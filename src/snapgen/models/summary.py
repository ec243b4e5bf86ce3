"""Model summaries for ``snapgen info``: parameters per part, stage layout and counted FLOPs.

FLOPs are counted by ``torch.utils.flop_counter`` (see :mod:`snapgen.utils.flops`) on the meta device, so even the
1.6B preset at 1024px is summarised in seconds without allocating weights. The count covers matmuls,
convolutions and attention (the ops that dominate); elementwise ops are not counted.
"""

from __future__ import annotations

import torch

from ..utils.flops import flop_counter
from ..utils.resolution import parse_resolution as _parse_resolution
from .config import PAPER_PARAMS, ThreeStageDiTConfig
from .three_stage_dit import ThreeStageDiT, check_latent_size

__all__ = ["parse_resolution", "count_flops", "summarize"]


def parse_resolution(text: str | int) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"768x1344"`` -> (768, 1344) as (height, width) in image pixels."""
    return _parse_resolution(text, error="resolution must look like 1024 or 768x1344 (height x width), got {!r}")


def latent_size(config: ThreeStageDiTConfig, resolution: tuple[int, int]) -> tuple[int, int]:
    H, W = resolution
    f = config.vae_factor
    step = f * config.downsample
    if H % f or W % f:
        raise ValueError(f"image size {H}x{W} is not a multiple of the VAE factor {f}; use multiples of {step} "
                         f"(e.g. {max(step, H // step * step)}x{max(step, W // step * step)})")
    h, w = H // f, W // f
    check_latent_size(h, w, config.downsample, f)
    return h, w


def count_flops(model: torch.nn.Module, latent_shape: tuple[int, ...], text_len: int, text_dim: int,
                batch: int = 1) -> int:
    """FLOPs of one forward pass (1 multiply-add = 2 FLOPs) for a model on any device (meta is fine)."""
    from .multiscale import denoiser_input_shapes

    device = next(model.parameters()).device
    x_shape, t_shape = denoiser_input_shapes(model.config, batch, tuple(latent_shape))  # DFM: the packed state
    x = torch.zeros(x_shape, device=device)
    t = torch.full(t_shape, 0.5, device=device)
    text = torch.zeros(batch, text_len, text_dim, device=device)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    with flop_counter() as counter, torch.no_grad():
        model(x, t, {"text": text, "text_mask": mask})
    return int(counter.get_total_flops())


def _param_groups(model: ThreeStageDiT) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = name.split(".")[0]
        key = {"down_blocks": "down", "middle_blocks": "middle", "middle_skips": "middle",
               "up_blocks": "up"}.get(key, "embed/out/resample")
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def summarize(config: ThreeStageDiTConfig, resolution: tuple[int, int], text_len: int = 128,
              name: str | None = None) -> dict:
    """Everything ``snapgen info`` reports, computed on the meta device."""
    h, w = latent_size(config, resolution)
    from .registry import build_model

    with torch.device("meta"):
        model = build_model(config)
    params = model.num_parameters()
    flops = count_flops(model, (config.in_channels, h, w), text_len, config.text_dim)
    out = {
        "preset": name,
        "params": params,
        "params_by_part": _param_groups(model),
        "weights_mib_fp32": round(params * 4 / 2**20, 1),
        "resolution": list(resolution),
        "latent_shape": [config.in_channels, h, w],
        "text_tokens": text_len,
        "stages": model.stages((h, w)),
        "flops_per_forward": flops,
        "width": config.width,
        "heads": config.heads,
        "kv_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "bna": {"tile": list(config.bna_tile), "radius": config.bna_radius, "backend": config.bna_backend},
        "config": config.to_dict(),
    }
    if name in PAPER_PARAMS:
        out["paper_params"] = int(PAPER_PARAMS[name])
        out["params_vs_paper"] = round(params / PAPER_PARAMS[name] - 1, 4)
    return out


def _tile_text(tile) -> str:
    """(4, 0) -> '4xW' (rows x whole width); (8, 8) -> '8x8'."""
    th, tw = tile
    return f"{th or 'H'}x{tw or 'W'}"


def format_summary(s: dict) -> str:
    lines = []
    title = f"snapgen {s['preset'] or 'model'}"
    lines.append(f"{title}: {s['params'] / 1e6:,.1f}M parameters ({s['weights_mib_fp32']:,} MiB fp32)"
                 + (f", paper {s['paper_params'] / 1e9:.1f}B ({s['params_vs_paper']:+.1%})" if "paper_params" in s
                    else ""))
    lines.append(f"  width {s['width']}, {s['heads']} heads x {s['head_dim']} (GQA: {s['kv_heads']} KV heads), "
                 f"BNA tile {_tile_text(s['bna']['tile'])} radius {s['bna']['radius']}")
    H, W = s["resolution"]
    c, h, w = s["latent_shape"]
    lines.append(f"  image {H}x{W} -> latent {c}x{h}x{w}, text {s['text_tokens']} tokens")
    lines.append(f"  {'stage':<8}{'blocks':>7}{'grid':>10}{'tokens':>9}  attention   params")
    for st in s["stages"]:
        g = f"{st['grid'][0]}x{st['grid'][1]}"
        p = s["params_by_part"].get(st["name"], 0)
        lines.append(f"  {st['name']:<8}{st['blocks']:>7}{g:>10}{st['tokens']:>9}  {st['attention']:<10}"
                     f"{p / 1e6:>7.1f}M")
    lines.append(f"  embed/out/resample params {s['params_by_part'].get('embed/out/resample', 0) / 1e6:.1f}M")
    lines.append(f"  FLOPs per forward (batch 1): {s['flops_per_forward'] / 1e12:.3f} TFLOP")
    return "\n".join(lines)
