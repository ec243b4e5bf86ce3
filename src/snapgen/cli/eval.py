"""``snapgen eval``: SceneEval per category (with 95% intervals), alignment score and FD of a model, with a report;
``--images DIR`` scores a folder in GenEval's layout instead, ``--compare A B`` pairs two runs (issue 20 §3-4)."""

from __future__ import annotations

import json

from ._common import add_device_args, pipeline_placement


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="SceneEval per category, alignment score and FD of a model, with a "
                                           "report (or of a GenEval image folder, or two runs compared)")
    p.add_argument("--model", help="pipeline folder (default: the shipped models/snapgen-micro)")
    p.add_argument("--prompts", help="GenEval-format JSONL prompt file, or a shipped set: headline (default: 480 prompts "
                                        "no training caption contains), sceneeval (in-distribution: training "
                                        "captions), sceneeval_paraphrase, sceneeval_heldout")
    p.add_argument("--images", metavar="DIR",
                   help="score the images of a folder in GenEval's layout (DIR/00000/metadata.jsonl, "
                        "DIR/00000/samples/0000.png, ...; e.g. from snapgen generate --geneval-metadata) instead "
                        "of generating; seed of sample k = the base seed it was written with + k")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="paired comparison of two runs on the same prompts and seeds: report folders of snapgen "
                        "eval (or their results.jsonl) or model folders (evaluated first, with the other flags)")
    p.add_argument("--seeds", type=int, help="images per prompt (seeds 0..N-1, default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="guidance weight (default: the model's)")
    p.add_argument("--quick", action="store_true", help="3 prompts per category, 1 seed")
    p.add_argument("--save-images", metavar="DIR",
                   help="also keep the generated images in GenEval's layout (re-score them with --images DIR)")
    p.add_argument("--out", help="report folder (default eval_report/, with --compare eval_compare/)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", help="elastic sub-network: tiny | small | full (default full)")
    p.add_argument("--base", action="store_true",
                   help="distilled models: use the base (teacher) model and its sampler instead of the few-step one")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..eval.run import compare_runs, evaluate_folder, format_comparison, format_report, run_evaluation

    if args.images and args.compare:
        raise ValueError("--images and --compare do not go together: score the folder first "
                         "(snapgen eval --images DIR --out R), then --compare R OTHER")
    seeds = 4 if args.seeds is None else args.seeds
    generation = [f for f, v in (("--model", args.model), ("--prompts", args.prompts), ("--seeds", args.seeds),
                                 ("--steps", args.steps),
                                 ("--cfg", args.cfg), ("--variant", args.variant), ("--device", args.device),
                                 ("--dtype", args.dtype)) if v is not None] + (["--base"] if args.base else []) \
        + (["--quick"] if args.quick else [])
    if args.save_images and (args.images or args.compare):
        raise ValueError("--save-images goes with a generating run (not --images or --compare)")
    if args.images:
        if generation:
            raise ValueError(f"{', '.join(generation)} cannot apply to --images: the images are already generated "
                             f"(their prompts are the folder's metadata.jsonl files)")
        out = args.out or "eval_report"
        summary = evaluate_folder(args.images, out_dir=out, progress=not args.no_progress)
    elif args.compare:
        if args.model:
            raise ValueError("--model cannot go with --compare: give the two model or report folders as A B")
        out = args.out or "eval_compare"
        kwargs = {"prompts_path": args.prompts, "seeds": seeds, "steps": args.steps, "guidance": args.cfg,
                  "quick": args.quick, "variant": args.variant, "base": args.base}
        if args.device is not None or args.dtype is not None:
            kwargs["device"], kwargs["dtype"] = pipeline_placement(args)
        comparison = compare_runs(*args.compare, out_dir=out, progress=not args.no_progress, **kwargs)
        print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison)
              + f"\ncomparison: {out}/compare.md")
        return 0
    else:
        device, dtype = pipeline_placement(args)
        out = args.out or "eval_report"
        summary = run_evaluation(args.model, args.prompts, seeds=seeds, steps=args.steps, guidance=args.cfg,
                                 quick=args.quick, out_dir=out, progress=not args.no_progress,
                                 variant=args.variant, base=args.base, device=device, dtype=dtype,
                                 save_images=args.save_images)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary))
        print(f"report: {out}/report.md")
    return 0
