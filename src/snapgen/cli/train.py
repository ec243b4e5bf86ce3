"""``snapgen train | distill | consolidate | plan``: training runs, FSDP checkpoints and memory plans."""

from __future__ import annotations

import json
import sys


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML config (resumes automatically)")
    p.add_argument("--config", required=True, help="configs/<name>.yaml")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps (a resumed run may be extended)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=cmd_train)


def _add_distill(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a trained model: kd (from a teacher), dmd (plain DMD2 to a "
                                              "few-step LoRA), kdmd (K-DMD); resumes automatically")
    from ..tasks import distill_methods

    p.add_argument("method", choices=distill_methods())  # from the task registry
    p.add_argument("--config", required=True, help="configs/distill/<name>.yaml")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_consolidate(subparsers) -> None:
    p = subparsers.add_parser("consolidate", help="turn an FSDP run's sharded checkpoint into the safetensors format")
    p.add_argument("--config", required=True, help="the run's training config")
    p.add_argument("--no-export", action="store_true", help="only rewrite the checkpoint")
    p.set_defaults(func=cmd_consolidate)


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory of a training config for N GPUs, component by component "
                                           "(meta-device dry run), and whether it fits the GPU")
    p.add_argument("--config", required=True, help="a flow, dmd or kdmd training config")
    p.add_argument("--gpus", type=int, nargs="+", default=[8], help="GPU counts to plan for (default 8)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB; GB = GiB as on GPU "
                                                         "spec sheets: an A100-80GB has 80 GiB)")
    p.add_argument("--batch-per-gpu", type=int, help="per-GPU batch (default: the config's batch_size)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: the config's distributed.strategy")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the config's)")
    p.add_argument("--text-len", type=int, help="text tokens (default: the config's text.max_length, else 300)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


_COMMANDS = {"train": _add_train, "distill": _add_distill, "consolidate": _add_consolidate, "plan": _add_plan}


def register(subparsers, *names: str) -> None:
    """Add this module's commands (all, or those named, in that order) to ``subparsers``."""
    for name in names or _COMMANDS:
        _COMMANDS[name](subparsers)


def _check_method(cfg, method: str, config_path: str) -> None:
    """``snapgen distill <method>``: the config must describe that method."""
    from ..tasks import distill_method

    if distill_method(cfg) != method:
        want = "task: flow with a kd: section" if method == "kd" else f"task: {method}"
        raise ValueError(f"snapgen distill {method} needs a config with {want}; {config_path} has task "
                         f"{cfg.task!r}" + (" and no kd: section" if cfg.task == "flow" else ""))


def cmd_train(args) -> int:
    """``snapgen train`` and ``snapgen distill``. Exit 3 when training diverges, 130 when interrupted."""
    from ..train import Trainer, TrainingDiverged, load_config

    overrides = {}
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.steps:
        overrides["steps"] = args.steps
    cfg = load_config(args.config, overrides)
    method = getattr(args, "method", None)
    if method is not None:
        _check_method(cfg, method, args.config)
    try:
        summary = Trainer(cfg, progress=not args.no_progress).fit(resume=not args.restart)
    except TrainingDiverged as e:
        print(f"snapgen train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("snapgen train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        if summary.get("rank", 0) != 0:
            return 0
    print(json.dumps(summary, indent=2))
    return 0


def cmd_consolidate(args) -> int:
    """Sharded (DCP) checkpoint of an FSDP run -> the standard safetensors checkpoint + an exported folder."""
    from pathlib import Path

    from ..train import Trainer, load_config
    from ..train.checkpoint import list_checkpoints

    cfg = load_config(args.config)
    ckpts = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {cfg.run_dir}/checkpoints")
    if not (ckpts[-1] / "dcp").is_dir():
        print(f"{ckpts[-1]} is already a consolidated (safetensors) checkpoint")
        return 0
    trainer = Trainer(cfg, progress=False)
    trainer.task.prepare(trainer.run_dir)
    trainer.resume()
    path = trainer.save()
    summary = trainer.finish() if not args.no_export else {}
    print(f"consolidated {ckpts[-1].name} -> {path}" + (f"; exported {summary['final_dir']}" if summary else ""))
    return 0


def cmd_plan(args) -> int:
    from ..train import load_config
    from ..train.plan import parse_memory
    from ..train.plan_tasks import plan_config

    cfg = load_config(args.config)
    memory = parse_memory(args.gpu_memory)
    plans = [plan_config(cfg, g, args.batch_per_gpu, args.strategy, args.resolution, args.text_len, memory)
             for g in args.gpus]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return 0
    res = args.resolution or cfg.data.get("resolution", 256)
    text_len = args.text_len or cfg.text.get("max_length", 300)
    print(f"{args.config}: task {cfg.task}, {res} px, {text_len} text tokens, precision {cfg.precision}; "
          f"memory in GiB per GPU")
    for p in plans:
        print(p.table())
    return 0
