"""``snapgen info | extract | combine-adapters``: inspect a model, cut out a sub-network, merge adapters."""

from __future__ import annotations

import json
import time

from ._common import load_model_config


def _namespaced_names() -> list[str]:
    from ..models.registry import model_names

    return model_names()


def _preset_names() -> list[str]:
    """The model names ``info --preset`` offers (besides ``all``), in the order ``all`` summarises them."""
    from ..models.registry import MODELS

    names = [p for family, _ in MODELS.items() for p in MODELS.meta(family)["presets"]]
    return [p for p in names if names.count(p) == 1]  # bare names, unambiguous across families


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameters, stage layout and FLOPs of a preset or config")
    p.add_argument("--preset", default="small", choices=[*_preset_names(), *_namespaced_names(), "all"],
                   help="model preset (default: small)")
    p.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--resolution", default="1024", help="image size, 1024 or HxW such as 768x1344 (default 1024)")
    p.add_argument("--text-len", type=int, default=128, help="text tokens for the FLOP count (default 128)")
    p.add_argument("--forward", action="store_true", help="also build the model and time one forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def _add_extract(subparsers) -> None:
    p = subparsers.add_parser("extract", help="write one elastic sub-network as a standalone pipeline folder")
    p.add_argument("--model", help="elastic pipeline folder (default: the shipped model)")
    p.add_argument("--variant", required=True, help="tiny | small | full")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="saved weight dtype")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_extract)


def _add_combine_adapters(subparsers) -> None:
    p = subparsers.add_parser("combine-adapters", help="one distilled pipeline from the few-step adapters of "
                                                       "several runs on the same base model (e.g. full from one "
                                                       "run, tiny/small from another)")
    p.add_argument("sources", nargs="+", help="DIR (all its variants) or DIR:tiny,small (those only); later wins")
    p.add_argument("--out", required=True, help="output pipeline folder (replaced)")
    p.set_defaults(func=cmd_combine_adapters)


_COMMANDS = {"info": _add_info, "extract": _add_extract, "combine-adapters": _add_combine_adapters}


def register(subparsers, *names: str) -> None:
    """Add this module's commands (all, or those named, in that order) to ``subparsers``."""
    for name in names or _COMMANDS:
        _COMMANDS[name](subparsers)


def cmd_info(args) -> int:
    from ..models.summary import format_summary, parse_resolution, summarize

    resolution = parse_resolution(args.resolution)
    names = _preset_names() if args.preset == "all" else [args.preset]
    summaries = []
    for name in names:
        config, label = load_model_config(name, args.config)
        s = summarize(config, resolution, text_len=args.text_len, name=label)
        if args.forward:
            s["forward"] = _forward(config, s)
        summaries.append(s)
        if args.config:
            break
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    else:
        for s in summaries:
            print(format_summary(s))
            if "forward" in s:
                f = s["forward"]
                print(f"  forward pass (random init, fp32, {f['threads']} threads): {f['seconds']:.2f} s, "
                      f"output {tuple(f['output_shape'])}, max |v| = {f['max_abs']:.3g}"
                      + ("  (a new model predicts exactly 0: adaLN-Zero init)" if f["max_abs"] == 0 else ""))
            print()
    return 0


def _forward(config, summary) -> dict:
    import torch

    from ..models import build_model

    torch.manual_seed(0)
    model = build_model(config).eval()
    c, h, w = summary["latent_shape"]
    x = torch.randn(1, c, h, w)
    text = torch.randn(1, summary["text_tokens"], config.text_dim)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(x, torch.tensor([1.0]), {"text": text})
        dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "output_shape": list(out.shape), "max_abs": float(out.abs().max()),
            "threads": torch.get_num_threads()}


def cmd_extract(args) -> int:
    from pathlib import Path

    import torch

    from ..pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model)
    if args.variant not in pipe.variants:
        raise ValueError(f"{args.model or 'the shipped model'} serves variants {pipe.variants}, not {args.variant!r}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ValueError(f"{out} exists and is not empty; choose another --out or pass --force")
    sub = pipe.extract(args.variant)
    sub.save_pretrained(out, dtype=getattr(torch, args.dtype))
    n_sup, n_sub = pipe.transformer.num_parameters(), sub.transformer.num_parameters()
    print(f"extracted {args.variant!r}: {n_sub / 1e6:.2f}M transformer parameters (the supernetwork file holds "
          f"{n_sup / 1e6:.2f}M) -> {out}")
    return 0


def cmd_combine_adapters(args) -> int:
    from ..distill.combine import combine_adapters, parse_source
    from ..pipelines import TextToImagePipeline

    from ..pipelines.card import write_pipeline_card

    out = combine_adapters([parse_source(s) for s in args.sources], args.out)
    pipe = TextToImagePipeline.from_pretrained(out)  # a folder that loads, or an error now rather than later
    write_pipeline_card(pipe, out)  # the combined folder's README.md (its weights are copied, not re-saved)
    print(f"wrote {out}: adapters {pipe.config.adapters}")
    return 0
