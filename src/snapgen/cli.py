"""``snapgen`` command line. Thin: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _load_config(args):
    from .models import PRESETS, ThreeStageDiTConfig

    if args.config:
        return ThreeStageDiTConfig.from_json(args.config), None
    return PRESETS[args.preset], args.preset


def cmd_info(args) -> int:
    from .models import PRESETS
    from .models.summary import format_summary, parse_resolution, summarize

    resolution = parse_resolution(args.resolution)
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    summaries = []
    for name in names:
        args_one = argparse.Namespace(**{**vars(args), "preset": name})
        config, label = _load_config(args_one)
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

    from .models import ThreeStageDiT

    torch.manual_seed(0)
    model = ThreeStageDiT(config).eval()
    c, h, w = summary["latent_shape"]
    x = torch.randn(1, c, h, w)
    text = torch.randn(1, summary["text_tokens"], config.text_dim)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(x, torch.tensor([1.0]), text)
        dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "output_shape": list(out.shape), "max_abs": float(out.abs().max()),
            "threads": torch.get_num_threads()}


def build_parser() -> argparse.ArgumentParser:
    from .models import PRESETS

    parser = argparse.ArgumentParser(prog="snapgen", description="SnapGen++ diffusion transformers for edge devices")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, stage layout and FLOPs of a preset or config")
    p.add_argument("--preset", default="small", choices=[*PRESETS, "all"], help="model preset (default: small)")
    p.add_argument("--config", help="a config.json instead of a preset")
    p.add_argument("--resolution", default="1024", help="image size, 1024 or HxW such as 768x1344 (default 1024)")
    p.add_argument("--text-len", type=int, default=128, help="text tokens for the FLOP count (default 128)")
    p.add_argument("--forward", action="store_true", help="also build the model and time one forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"snapgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
