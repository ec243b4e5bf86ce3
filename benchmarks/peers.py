"""SnapGen++ ``small`` against its peers: per-step CPU latency, peak memory and FLOPs of one denoiser
forward pass, at the same IMAGE resolution, for

* PixArt-Sigma-XL-2 (0.6B, diffusers ``PixArtTransformer2DModel``): SD-VAE latent (image/8, 4 channels),
  2x2 patches, isotropic 28-block DiT with dense attention; 300 T5 tokens (4096-d).
* Sana-0.6B (diffusers ``SanaTransformer2DModel``, ``Sana_600M_1024px`` config): DC-AE latent
  (image/32, 32 channels), 1x1 patches, 28 blocks with linear self-attention; 300 Gemma-2-2b tokens (2304-d).
* snapgen ``small`` (``build_model("snapgenpp/small")``): Qwen-Image VAE latent (image/8, 16 channels),
  2x2 patches, Down (ASSA) / Middle (dense, 2x2-merged tokens) / Up (ASSA); 300 tokens of 2560-d text.

How: every model has random weights (full size, fp32, eval, ``torch.inference_mode``, batch 1). The main
process starts one fresh worker process per (model, resolution), so each peak RSS is that model's own.
A worker builds the model and its inputs, counts the FLOPs of one forward with
``torch.utils.flop_counter.FlopCounterMode`` (a separate pass), then times 1 warmup + N forwards and
prints one JSON line. FLOPs count matmuls, convolutions and attention (2 FLOPs per multiply-add);
elementwise ops, norms and copies are free in this count but not in time.

``--profile`` instead runs ``torch.profiler`` (CPU) on one forward of snapgen ``small`` and Sana at
1024px and writes to ``results/peers_profile.md`` the top ops by self CPU time, the time and FLOP rate
of each FLOP-counted op (the rest is gathers, copies, elementwise ops and norms), and a per-shape split.

Timings need an otherwise idle machine: anything else on the cores (tests, other benchmarks) shows up
directly in ms/step. The header records the snapgen commit measured (``-dirty`` for uncommitted src/).

Usage::

    python benchmarks/peers.py            # -> results/peers.md, results/peers.json
    python benchmarks/peers.py --profile  # -> results/peers_profile.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import (RESULTS, current_rss_mib, machine, matmul_gflops, md_table, median_ms, peak_rss_mib,
                     run_worker, setup_torch, write_results)

MODELS = ("pixart-sigma", "sana-0.6b", "snapgen-small")
RESOLUTIONS = (512, 1024)
REPEATS = {512: 5, 1024: 3}
TEXT_TOKENS = 300
PROFILE_MODELS = ("snapgen-small", "sana-0.6b")
PROFILE_RESOLUTION = 1024
PROFILE_TOP = 15

# Goals at 1024px (the issue): faster per step than Sana-0.6B, and at least the paper's isotropic-to-final
# iPhone ratio (2000 ms -> 360 ms) faster than PixArt-Sigma; lower peak memory than both.
GOAL_RESOLUTION = 1024
PIXART_SPEEDUP_GOAL = 2000 / 360


# ----------------------------------------------------------------------------------------------------------
# Worker: build one model, count its FLOPs, time it
# ----------------------------------------------------------------------------------------------------------

def build(name: str, resolution: int):
    """``(model, forward, tokens)``: a random-weight model, a closure running one denoiser forward on
    fixed inputs for an image of ``resolution`` pixels, and the number of image tokens it sees."""
    torch = setup_torch()
    ones = torch.ones(1, TEXT_TOKENS)
    if name == "pixart-sigma":
        from diffusers import PixArtTransformer2DModel

        latent = resolution // 8
        model = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, caption_channels=4096, sample_size=latent, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False, attention_bias=True,
            norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, upcast_attention=False, dropout=0.0,
            interpolation_scale=max(resolution // 512, 1))
        x, text, t = torch.randn(1, 4, latent, latent), torch.randn(1, TEXT_TOKENS, 4096), torch.tensor([500.0])
        cond = {"resolution": None, "aspect_ratio": None}

        def forward():
            return model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond,
                         encoder_attention_mask=ones, return_dict=False)[0]

        tokens = (latent // 2) ** 2
    elif name == "sana-0.6b":
        from diffusers import SanaTransformer2DModel

        latent = resolution // 32
        model = SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
            num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
            caption_channels=2304, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=latent,
            patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6)
        x, text, t = torch.randn(1, 32, latent, latent), torch.randn(1, TEXT_TOKENS, 2304), torch.tensor([500.0])

        def forward():
            return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=ones,
                         return_dict=False)[0]

        tokens = latent**2
    elif name == "snapgen-small":
        from snapgen.models import build_model

        model = build_model("snapgenpp/small")
        cfg = model.config
        latent = resolution // cfg.vae_factor
        x, text = torch.randn(1, cfg.in_channels, latent, latent), torch.randn(1, TEXT_TOKENS, cfg.text_dim)
        t, mask = torch.tensor([0.5]), ones.bool()

        def forward():
            return model(x, t, {"text": text, "text_mask": mask})

        tokens = (latent // cfg.patch_size) ** 2
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    # No parameter needs grad; FlopCounterMode's module tracker otherwise trips over Sana passing a
    # Parameter (scale_shift_table) as a module input under inference_mode.
    model.eval().requires_grad_(False)
    return model, forward, tokens


def count_flops(forward) -> tuple[int, dict[str, int]]:
    """FLOPs of one ``forward()``: total and by aten op, with snapgen's counter (which also counts the CPU
    flash-attention kernel that torch's registry misses)."""
    from snapgen.utils.flops import flop_counter

    with flop_counter() as counter:
        forward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def profile_forward(forward) -> dict:
    """Top ops by self CPU time of one ``forward()`` after a warmup, plus the time of each op that
    FlopCounterMode counts. A second profiled forward records input shapes for a per-shape split;
    shape recording slows ops down (up to ~2x here), so only the first one's times are used."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    events = prof.key_averages()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as shaped:
        forward()
    return {
        "by_op": events.table(sort_by="self_cpu_time_total", row_limit=PROFILE_TOP),
        "by_shape": shaped.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=PROFILE_TOP, max_name_column_width=40,
            max_shapes_column_width=70),
        "total_s": sum(e.self_cpu_time_total for e in events) / 1e6,
        "op_total_s": {e.key: e.cpu_time_total / 1e6 for e in events},
    }


def worker(spec: dict) -> dict:
    torch = setup_torch()
    with torch.inference_mode():
        model, forward, tokens = build(spec["model"], spec["resolution"])
        params = sum(p.numel() for p in model.parameters())
        result = {**spec, "params": params, "tokens": tokens, "rss_after_build_mib": current_rss_mib()}
        flops, flops_by_op = count_flops(forward)
        if spec.get("profile"):
            return {**result, "flops": flops, "flops_by_op": flops_by_op, **profile_forward(forward)}
        ms, times = median_ms(forward, repeats=spec["repeats"], warmup=1)
    return {**result, "median_ms": ms, "times_ms": times, "peak_rss_mib": peak_rss_mib(), "flops": flops,
            "flops_by_op": flops_by_op, "gflops_per_s": flops / (ms / 1000) / 1e9}


# ----------------------------------------------------------------------------------------------------------
# Main process: one worker per (model, resolution), then the table and the goals
# ----------------------------------------------------------------------------------------------------------

def ratios(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per resolution: peer ms / snapgen-small ms and peer peak RSS / snapgen-small peak RSS."""
    by = {(r["model"], r["resolution"]): r for r in rows}
    out = {}
    for res in RESOLUTIONS:
        ours = by[("snapgen-small", res)]
        out[res] = {}
        for peer in ("pixart-sigma", "sana-0.6b"):
            out[res][f"{peer}_ms_ratio"] = by[(peer, res)]["median_ms"] / ours["median_ms"]
            out[res][f"{peer}_rss_ratio"] = by[(peer, res)]["peak_rss_mib"] / ours["peak_rss_mib"]
    return out


def goals(rows: list[dict], rat: dict) -> list[tuple[str, bool, str]]:
    by = {(r["model"], r["resolution"]): r for r in rows}
    r = rat[GOAL_RESOLUTION]
    rss = {m: by[(m, GOAL_RESOLUTION)]["peak_rss_mib"] for m in MODELS}
    return [
        (f"faster per step than Sana-0.6B at {GOAL_RESOLUTION}px", r["sana-0.6b_ms_ratio"] > 1,
         f"Sana / snapgen-small = {r['sana-0.6b_ms_ratio']:.2f}x"),
        (f">= {PIXART_SPEEDUP_GOAL:.2f}x faster per step than PixArt-Sigma at {GOAL_RESOLUTION}px",
         r["pixart-sigma_ms_ratio"] >= PIXART_SPEEDUP_GOAL,
         f"PixArt-Sigma / snapgen-small = {r['pixart-sigma_ms_ratio']:.2f}x"),
        (f"lower peak memory than both at {GOAL_RESOLUTION}px",
         rss["snapgen-small"] < min(rss["pixart-sigma"], rss["sana-0.6b"]),
         f"peak RSS MiB: snapgen-small {rss['snapgen-small']:.0f}, Sana {rss['sana-0.6b']:.0f}, "
         f"PixArt-Sigma {rss['pixart-sigma']:.0f}"),
    ]


def header(mach: dict, gflops: float) -> str:
    return (f"snapgen {source_commit()}, {mach['cpu']}, {mach['threads']} threads, torch {mach['torch']}, "
            f"diffusers {diffusers_version()}, Python {mach['python']}, {mach['date']}. "
            f"fp32 matmul roofline: {gflops:.1f} GFLOP/s.")


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def source_commit() -> str:
    """The measured snapgen source: this checkout's commit, ``-dirty`` if src/ has uncommitted edits."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--", "src") else "")


def benchmark() -> None:
    mach, gflops = machine(), matmul_gflops()
    print(header(mach, gflops), flush=True)
    rows = []
    for res in RESOLUTIONS:
        for name in MODELS:
            r = run_worker(__file__, {"model": name, "resolution": res, "repeats": REPEATS[res]})
            print(f"  {name:14s} {res:5d}px  {r['median_ms']:9.0f} ms/step  peak {r['peak_rss_mib']:6.0f} MiB  "
                  f"{r['gflops_per_s']:5.1f} GFLOP/s", flush=True)
            rows.append(r)
    rat = ratios(rows)

    table = md_table(
        ["model", "image px", "params (M)", "tokens", "median ms/step", "peak RSS MiB", "RSS after build MiB",
         "GFLOP/s", "GFLOPs/step"],
        [[r["model"], r["resolution"], r["params"] / 1e6, r["tokens"], r["median_ms"], r["peak_rss_mib"],
          r["rss_after_build_mib"], r["gflops_per_s"], r["flops"] / 1e9] for r in rows])
    ratio_table = md_table(
        ["image px", "PixArt-Sigma ms / snapgen-small ms", "Sana ms / snapgen-small ms",
         "PixArt-Sigma RSS / snapgen-small RSS", "Sana RSS / snapgen-small RSS"],
        [[res, v["pixart-sigma_ms_ratio"], v["sana-0.6b_ms_ratio"], v["pixart-sigma_rss_ratio"],
          v["sana-0.6b_rss_ratio"]] for res, v in rat.items()])
    checks = goals(rows, rat)
    goal_lines = "\n".join(f"- [{'x' if ok else ' '}] {what}: **{'met' if ok else 'NOT met'}** ({detail})"
                           for what, ok, detail in checks)
    markdown = f"""# snapgen small vs PixArt-Sigma and Sana-0.6B: one denoiser step on CPU

{header(mach, gflops)}

Random weights at full size, fp32, batch 1, one forward pass (= one sampling step), 300 text tokens;
each model on its own native latent for the same image size (PixArt-Sigma: image/8 x 4 ch, 2x2 patches;
Sana: image/32 x 32 ch, 1x1 patches; snapgen small: image/8 x 16 ch, 2x2 patches). Median of
{REPEATS[1024]} runs at 1024px and {REPEATS[512]} at 512px after one warmup, each (model, resolution) in
its own process. FLOPs: matmuls, convolutions and attention (FlopCounterMode; 2 per multiply-add).
"tokens" are the image tokens of the full-resolution grid (snapgen's Middle stage sees a quarter).
Produced by `python benchmarks/peers.py`.

{table}

{ratio_table}

## Goals (from the issue, at {GOAL_RESOLUTION}px)

snapgen small should be faster per step than Sana-0.6B, at least {PIXART_SPEEDUP_GOAL:.2f}x faster than
PixArt-Sigma (the paper's isotropic-to-final iPhone latency, 2000 ms -> 360 ms), and use less peak memory
than both.

{goal_lines}
"""
    print("\n" + table + "\n\n" + ratio_table + "\n\n" + goal_lines)
    write_results("peers", {"machine": mach, "matmul_gflops": gflops, "diffusers": diffusers_version(),
                            "snapgen_commit": source_commit(),
                            "rows": rows, "ratios": rat,
                            "goals": [{"goal": w, "met": ok, "detail": d} for w, ok, d in checks]}, markdown)


def flops_vs_time(r: dict) -> str:
    """Markdown table: each op that does counted FLOPs, its profiled time (inclusive) and its FLOP rate;
    the rest of the time goes to ops with no counted FLOPs (copies, gathers, elementwise, norms)."""
    rows, counted_s = [], 0.0
    for op, flops in sorted(r["flops_by_op"].items(), key=lambda kv: -kv[1]):
        seconds = r["op_total_s"].get(op.replace(".", "::", 1), 0.0)
        counted_s += seconds
        rows.append([op.split(".", 1)[1], flops / 1e9, seconds, flops / seconds / 1e9 if seconds else "-"])
    rows.append(["everything else", 0.0, r["total_s"] - counted_s, "-"])
    rows.append(["total", r["flops"] / 1e9, r["total_s"], r["flops"] / r["total_s"] / 1e9])
    return md_table(["op", "GFLOPs", "profiled s", "GFLOP/s"], rows)


def profile() -> None:
    mach, gflops = machine(), matmul_gflops()
    sections = []
    for name in PROFILE_MODELS:
        r = run_worker(__file__, {"model": name, "resolution": PROFILE_RESOLUTION, "profile": True})
        title = f"{name} at {PROFILE_RESOLUTION}px ({r['params'] / 1e6:.0f}M params, {r['tokens']} image tokens)"
        split = flops_vs_time(r)
        print(f"\n## {title}\n\n{r['by_op']}\n{split}")
        sections.append(f"## {title}\n\nTop {PROFILE_TOP} ops by self CPU time:\n\n```\n{r['by_op']}```\n\n"
                        f"FLOPs against time:\n\n{split}\n\nSplit by input shapes (a separate forward with "
                        f"shape recording, which inflates op times; use it for the split, not the totals):"
                        f"\n\n```\n{r['by_shape']}```\n")
    markdown = (f"# Where one denoiser step spends its CPU time: snapgen small vs Sana-0.6B\n\n"
                f"{header(mach, gflops)}\n\ntorch.profiler (CPU activities) over one forward after warmup; "
                f"random weights, fp32, batch 1, 300 text tokens. Produced by "
                f"`python benchmarks/peers.py --profile`.\n\n" + "\n".join(sections))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "peers_profile.md"
    path.write_text(markdown)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="profile snapgen small and Sana at 1024px")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
    elif args.profile:
        profile()
    else:
        benchmark()


if __name__ == "__main__":
    sys.exit(main())
