"""The paper's Fig. 3 ablation on this CPU: isotropic DiT -> three-stage DiT (dense) -> three-stage DiT + ASSA.

All three at the `small` preset's width (1024, 16 heads, 8 KV heads) and total depth (23 blocks):
  (A) IsotropicDiT: PixArt-style, dense self-attention on every block at the full token grid, FFN ratio 3;
  (B) ThreeStageDiT with dense self-attention in Down/Up;
  (C) ThreeStageDiT with ASSA in Down/Up (the shipped design).
Per-step latency (one denoiser forward, batch 1, fp32, inference mode; median of repeats) and peak resident
memory, each model in its own process, at 512px and 1024px, beside the paper's iPhone 16 Pro Max latencies
(2000 ms -> 550 ms -> 293 ms at 1024px).

    python benchmarks/ablation.py [--resolutions 512 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (current_rss_mib, machine, matmul_gflops, md_table, median_ms, peak_rss_mib, run_worker,  # noqa: E402
                     setup_torch, write_results)

PAPER_MS = {"isotropic": 2000, "three-stage dense": 550, "three-stage ASSA": 293}
VARIANTS = {"isotropic": ("isotropic", "dense"), "three-stage dense": ("three_stage", "dense"),
            "three-stage ASSA": ("three_stage", "assa")}
TEXT_LEN = 128


def worker(spec: dict) -> dict:
    torch = setup_torch()
    from snapgen.models import MODELS, preset
    from snapgen.models.summary import count_flops

    cfg = preset("small", outer_attention=spec["attention"])
    cls = MODELS.get("isotropic_dit" if spec["family"] == "isotropic" else "three_stage_dit")
    h = w = spec["resolution"] // cfg.vae_factor
    with torch.device("meta"):
        flops = count_flops(cls(cfg), (cfg.in_channels, h, w), TEXT_LEN, cfg.text_dim)
    rss0 = current_rss_mib()
    model = cls(cfg).eval()
    x = torch.randn(1, cfg.in_channels, h, w)
    text = torch.randn(1, TEXT_LEN, cfg.text_dim)
    t = torch.tensor([0.5])
    rss_model = current_rss_mib()
    with torch.inference_mode():
        ms, times = median_ms(lambda: model(x, t, {"text": text}), repeats=spec["repeats"], warmup=1)
    return {"params": sum(p.numel() for p in model.parameters()), "median_ms": ms, "times_ms": times,
            "flops": flops, "weights_mib": rss_model - rss0, "peak_rss_mib": peak_rss_mib()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    peak = matmul_gflops()
    rows = []
    for res in args.resolutions:
        for name, (family, attn) in VARIANTS.items():
            r = run_worker(__file__, {"family": family, "attention": attn, "resolution": res,
                                      "repeats": args.repeats})
            r.update(variant=name, resolution=res, gflops=r["flops"] / r["median_ms"] / 1e6)
            rows.append(r)
            print(f"{res}px {name:<18} {r['median_ms'] / 1000:7.2f} s/step  peak {r['peak_rss_mib']:7.0f} MiB  "
                  f"{r['gflops']:.0f} GFLOP/s", flush=True)

    table_rows = []
    for r in rows:
        base = next(b for b in rows if b["resolution"] == r["resolution"] and b["variant"] == "isotropic")
        paper = PAPER_MS[r["variant"]] if r["resolution"] == 1024 else None
        table_rows.append([
            r["resolution"], r["variant"], f"{r['params'] / 1e6:.0f}M", f"{r['flops'] / 1e12:.2f}",
            round(r["median_ms"]), f"{base['median_ms'] / r['median_ms']:.2f}x", round(r["peak_rss_mib"]),
            round(r["gflops"]), f"{r['gflops'] / peak:.0%}",
            f"{paper} ms ({2000 / paper:.2f}x)" if paper else "-"])
    headers = ["px", "variant", "params", "TFLOP/step", "ms/step", "speedup vs isotropic", "peak RSS MiB",
               "GFLOP/s", "of matmul peak", "paper iPhone 16 Pro Max"]
    table = md_table(headers, table_rows)
    m = machine()
    md = (f"# Fig. 3 ablation on this CPU (small width: 1024, 23 blocks)\n\n"
          f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, fp32, batch 1, {TEXT_LEN} text tokens, "
          f"median of {args.repeats}; fp32 matmul peak measured in the same run: {peak:.0f} GFLOP/s; {m['date']}.\n\n"
          f"`python benchmarks/ablation.py`\n\n{table}\n\n"
          f"Peak RSS is the whole worker process (weights + activations + PyTorch runtime).\n")
    print("\n" + table)
    write_results("ablation", {"machine": m, "matmul_gflops": peak, "rows": rows}, md)


if __name__ == "__main__":
    main()
