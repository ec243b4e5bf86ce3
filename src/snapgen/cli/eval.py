"""``snapgen eval``: SceneEval per category, alignment score and FD of a model, with a report."""

from __future__ import annotations

import json

from ._common import add_device_args, pipeline_placement


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="SceneEval per category, alignment score and FD of a model, with a "
                                           "report")
    p.add_argument("--model", help="pipeline folder (default: the shipped models/snapgen-micro)")
    p.add_argument("--prompts", help="GenEval-format JSONL prompt file (default: the shipped sceneeval set)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1, default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="guidance weight (default: the model's)")
    p.add_argument("--quick", action="store_true", help="3 prompts per category, 1 seed")
    p.add_argument("--out", default="eval_report", help="report folder (default eval_report/)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", help="elastic sub-network: tiny | small | full (default full)")
    p.add_argument("--base", action="store_true",
                   help="distilled models: use the base (teacher) model and its sampler instead of the few-step one")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..eval.run import format_report, run_evaluation

    device, dtype = pipeline_placement(args)
    summary = run_evaluation(args.model, args.prompts, seeds=args.seeds, steps=args.steps, guidance=args.cfg,
                             quick=args.quick, out_dir=args.out, progress=not args.no_progress,
                             variant=args.variant, base=args.base, device=device, dtype=dtype)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary))
        print(f"report: {args.out}/report.md")
    return 0
