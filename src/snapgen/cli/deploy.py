"""``snapgen export | quantize | bench``: deployment formats, weight quantization and the device report."""

from __future__ import annotations

import json

from ._common import parse_resolution, read_prompts


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a pipeline for deployment (ONNX: text encoder, DiT step, "
                                             "decoder)")
    p.add_argument("format", choices=["onnx", "executorch", "coreml"])
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--variant", help="elastic sub-network to export (default: the pipeline's default)")
    p.add_argument("--resolution", help="image size in pixels, N or HxW (default: the model's)")
    p.add_argument("--base", action="store_true", help="distilled models: export the base (teacher) sampler")
    p.add_argument("--rewrite", action="store_true",
                   help="onnx: use the on-device graph form (BNA as gathers + batched attention); "
                        "executorch/coreml always do")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="onnx: weights and activations of the graphs (fp16 halves the files; the runtime feeds "
                        "fp16 inputs and returns fp32)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)


def _add_quantize(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="k-means weight quantization of one variant (SnapGen++: ~4.3 bits)")
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--variant", help="elastic sub-network (default: the pipeline's default)")
    p.add_argument("--bits", type=float, default=4.3, help="target mean bits per clustered weight (4-8)")
    p.add_argument("--finetune-steps", type=int, default=100, help="self-distillation steps for biases/norms")
    p.add_argument("--prompts-file", help="calibration prompts, one per line (default: 16 SceneEval prompts)")
    p.add_argument("--calibration", default="sampler",
                   help="calibration inputs: sampler (default; the states the model's own sampler visits -- a "
                        "distilled model's few-step times) or uniform (final latents re-noised at random times)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration noise")
    p.add_argument("--base", action="store_true", help="distilled models: quantize the base (teacher) model")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.set_defaults(func=cmd_quantize)


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="device report: latency, memory, size (and quality) per variant and "
                                            "backend")
    p.add_argument("what", choices=["device"])
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--variants", nargs="+", help="default: every variant the model serves")
    p.add_argument("--backends", nargs="+", default=["eager", "onnx", "executorch"],
                   choices=["eager", "onnx", "executorch"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "quant", "int8"], choices=["fp32", "quant", "int8"],
                   help="quant = k-means (eager) / onnxruntime int8 (onnx); int8 = torchao weight-only (eager)")
    p.add_argument("--resolution", help="export resolution, N or HxW (default: the model's)")
    p.add_argument("--eval", choices=["none", "quick", "full"], default="none", help="also SceneEval/alignment/FD")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--work", default="runs/device_bench", help="where exports are cached")
    p.add_argument("--out", default="benchmarks/results", help="writes device.json and device.md here ('' = no)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


_COMMANDS = {"export": _add_export, "quantize": _add_quantize, "bench": _add_bench}


def register(subparsers, *names: str) -> None:
    """Add this module's commands (all, or those named, in that order) to ``subparsers``."""
    for name in names or _COMMANDS:
        _COMMANDS[name](subparsers)


def _load_pipeline(args):
    from ..pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model, variant=args.variant)
    if args.base:
        pipe.use_base()
    return pipe


def cmd_export(args) -> int:
    if args.dtype != "fp32" and args.format != "onnx":
        raise ValueError(f"--dtype {args.dtype} is an onnx export option; {args.format} exports are fp32 "
                         f"(drop --dtype or use: snapgen export onnx --dtype {args.dtype})")
    pipe = _load_pipeline(args)
    res = parse_resolution(args.resolution) if args.resolution else None
    if args.format == "onnx":
        from ..export.onnx import export_onnx

        out = export_onnx(pipe, args.out, resolution=res, rewrite=args.rewrite, dtype=args.dtype)
    elif args.format == "executorch":
        from ..export.mobile import export_executorch

        out = export_executorch(pipe, args.out, resolution=res)
    else:
        from ..export.mobile import export_coreml

        out = export_coreml(pipe, args.out, resolution=res)
        print(f"Core ML packages written to {out}; running them needs macOS (coremltools predict / Xcode)")
        return 0
    print(f"generate with: snapgen generate \"a red circle\" --backend {args.format} --model {out}")
    return 0


def cmd_quantize(args) -> int:
    import os

    from ..compress.calibration import check_mode
    from ..export.quantize import quantize_pipeline

    check_mode(args.calibration)  # a bad value: one-line error before the model loads
    pipe = _load_pipeline(args)
    if args.prompts_file:
        prompts = read_prompts([], args.prompts_file)
    else:
        from ..eval.sceneeval import load_prompts, prompt_path

        prompts = [p["prompt"] for p in load_prompts(prompt_path("sceneeval"))][::4][:16]
    out = quantize_pipeline(pipe, args.out, prompts, args.bits, args.finetune_steps,
                            calibration=args.calibration, seed=args.seed)
    size = os.path.getsize(out / "transformer" / "quantized.safetensors")
    fp32 = 4 * pipe.extract(pipe.variant).transformer.num_parameters()
    print(f"{out}: transformer {size / 1e6:.2f} MB ({fp32 / size:.1f}x smaller than fp32 {fp32 / 1e6:.2f} MB)")
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from ..export.device_report import device_report, format_report

    if args.what != "device":
        raise ValueError("snapgen bench supports: device")
    report = device_report(args.model, args.variants, args.backends, args.precisions, args.work,
                           parse_resolution(args.resolution) if args.resolution else None, args.eval, args.repeats,
                           progress=(lambda *_: None) if args.json else print)
    if args.out:  # the measurements first: nothing measured is lost if formatting fails
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device.json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_report(report)
    if args.out:
        (out / "device.md").write_text("# Device report\n\n" + report["note"] + "\n\n" + table + "\n")
    print(json.dumps(report, indent=2) if args.json else table)
    return 0
