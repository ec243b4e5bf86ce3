"""``snapgen select``: measure each elastic variant's per-step latency here; pick the widest within a budget."""

from __future__ import annotations

import json

from ._common import parse_resolution


def register(subparsers) -> None:
    p = subparsers.add_parser("select", help="measure each variant's per-step latency here; pick the widest "
                                             "within a budget")
    p.add_argument("--budget-ms", type=float, required=True, help="latency budget per sampling step, ms")
    p.add_argument("--resolution", default="64", help="image size in pixels, N or HxW (default 64)")
    p.add_argument("--model", help="elastic pipeline folder (default: the shipped model)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median is used)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_select)


def cmd_select(args) -> int:
    """Exit 0 with the chosen variant, 1 when none fits the budget."""
    import torch

    from ..elastic.select import measure_step_latency, select_variant
    from ..models.three_stage_dit import check_latent_size
    from ..pipelines import TextToImagePipeline

    if args.budget_ms <= 0:
        raise ValueError(f"--budget-ms must be positive, got {args.budget_ms}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    H, W = parse_resolution(args.resolution)
    f = pipe.vae_factor
    if H % f or W % f:
        raise ValueError(f"resolution {H}x{W} is not a multiple of the VAE factor {f}")
    cfg = pipe.transformer.config
    check_latent_size(H // f, W // f, cfg.downsample, cfg.vae_factor)
    rows = {}
    for name in pipe.variants:
        m = measure_step_latency(pipe.transformer, name, (H // f, W // f), text_len=_text_len(pipe.config),
                                 repeats=args.repeats)
        rows[name] = {"ratio": pipe.transformer.variants[name],
                      "params": pipe.extract(name).transformer.num_parameters(), **m}
    chosen = select_variant({n: r["median_ms"] for n, r in rows.items()}, pipe.transformer.variants,
                            args.budget_ms)
    result = {"budget_ms": args.budget_ms, "resolution": [H, W], "threads": torch.get_num_threads(),
              "selected": chosen, "variants": rows,
              "latency": "one denoiser call on 1 image with CFG (batch 2), median over repeats"}
    _print_selection(args, result)
    return 0 if chosen is not None else 1


def _print_selection(args, result: dict) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
        return
    (H, W), rows, chosen = result["resolution"], result["variants"], result["selected"]
    print(f"per-step latency at {H}x{W} on this machine ({result['threads']} threads, CFG batch 2):")
    print(f"{'variant':8s} {'width':>6s} {'params':>9s} {'median ms':>10s}")
    for name, r in rows.items():
        mark = "  <- selected" if name == chosen else ""
        print(f"{name:8s} {r['ratio']:6.3f} {r['params'] / 1e6:8.2f}M {r['median_ms']:10.2f}{mark}")
    if chosen is None:
        print(f"no variant fits {args.budget_ms} ms per step; the smallest takes "
              f"{min(r['median_ms'] for r in rows.values()):.2f} ms")


def _text_len(config) -> int:
    """Tokens the denoiser reads: the sum over the pipeline's text encoders (their sequences are concatenated)."""
    m = config.text_max_length
    return sum(m) if isinstance(m, list) else int(m) * (1 if isinstance(config.text_encoder, str)
                                                        else len(config.text_encoder))
