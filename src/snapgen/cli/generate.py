"""``snapgen generate``: images from text prompts (PyTorch pipeline, or an ONNX / ExecuTorch export)."""

from __future__ import annotations

import time

from ._common import add_device_args, pipeline_placement, read_prompts, variant_grid, write_images

_BACKEND_NAMES = {"onnx": "onnxruntime", "executorch": "ExecuTorch"}


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from text prompts")
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--out", default="out.png",
                   help="output PNG (one prompt, or the grid with --grid) or a folder: one PNG per prompt, "
                        "plus grid.png with --grid (default out.png)")
    p.add_argument("--model", help="pipeline folder (default: the shipped models/snapgen-micro)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance weight w in v_u + w (v_c - v_u)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size in pixels")
    p.add_argument("--grid", action="store_true", help="also write a grid image with the prompts under the images")
    p.add_argument("--scale", type=int, default=2, help="pixel upscale of grid cells (default 2)")
    p.add_argument("--variant", help="elastic sub-network: tiny | small | full (default full); 'all' or a comma "
                                     "list generates with each (same seed) into a prompt x variant grid")
    p.add_argument("--base", action="store_true",
                   help="distilled models: use the base (teacher) model and its sampler instead of the few-step one")
    p.add_argument("--backend", choices=["torch", "onnx", "executorch"], default="torch",
                   help="onnx / executorch: run an export folder (snapgen export onnx|executorch)")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from pathlib import Path

    from ..pipelines import default_model_dir

    prompts = read_prompts(args.prompt, args.prompts_file)
    for p in prompts:
        if not p.strip():
            raise ValueError('empty prompt: describe the image, e.g. "a red circle to the left of a blue square"')
    if args.size is not None and len(args.size) != 2:
        raise ValueError("--size takes two numbers: HEIGHT WIDTH")
    model_dir = Path(args.model) if args.model else default_model_dir()
    t0 = time.perf_counter()
    exported = args.backend in ("onnx", "executorch")
    if exported:
        pipe = _load_exported(args, model_dir)
    else:
        pipe, names, several = _load_torch(args, model_dir)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    if exported:
        images, captions, cols, seconds = pipe(prompts, seed=args.seed), prompts, None, {}
    else:
        images, captions, cols, seconds = _run_torch(args, pipe, prompts, names, several)
    t_gen = time.perf_counter() - t1
    for w in write_images(images, captions, args.out, grid=args.grid, cols=cols, scale=args.scale):
        print(w)
    if args.backend == "torch" and len(seconds) > 1:
        print("per variant: " + ", ".join(f"{k} {v / (len(images) // len(seconds)):.2f} s per image"
                                          for k, v in seconds.items()))
    variant = pipe.meta["variant"] if args.backend != "torch" else "/".join(seconds)
    print(f"generated {len(images)} image(s) of {images[0].size[1]}x{images[0].size[0]} "
          f"{'with the ' + variant + ' variant ' if variant != 'full' else ''}"
          f"{'(' + _BACKEND_NAMES[args.backend] + ') ' if args.backend != 'torch' else ''}"
          f"in {t_gen:.2f} s "
          f"({t_gen / len(images):.2f} s per image; model load {t_load:.1f} s)")
    return 0


def _load_exported(args, model_dir):
    """The ONNX / ExecuTorch pipeline of an export folder; the settings fixed at export time are refused."""
    from ..export.mobile import ExecuTorchPipeline
    from ..export.onnx import OnnxPipeline

    if not args.model:
        raise ValueError(f"--backend {args.backend} needs --model EXPORT_DIR (a folder from "
                         f"`snapgen export {args.backend}`)")
    fixed = [f for f, v in (("--steps", args.steps), ("--cfg", args.cfg), ("--size", args.size),
                            ("--variant", args.variant), ("--device", args.device), ("--dtype", args.dtype))
             if v is not None] + (["--base"] if args.base else [])
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change an exported model (its variant, size, sampler, "
                         f"guidance and precision are fixed at export time, and it runs on its runtime's CPU "
                         f"provider); export again with the settings you want")
    return (OnnxPipeline if args.backend == "onnx" else ExecuTorchPipeline)(model_dir)


def _load_torch(args, model_dir):
    """``(pipeline, variant names to generate with, several)``; several = a prompt x variant grid."""
    from ..pipelines import TextToImagePipeline

    device, dtype = pipeline_placement(args)  # checked before the (slow) load
    several = args.variant is not None and (args.variant == "all" or "," in args.variant)
    pipe = TextToImagePipeline.from_pretrained(model_dir, variant=None if several else args.variant)
    pipe.to(device, dtype)
    names = [pipe.variant]
    if several:  # one supernetwork, several sub-networks: a prompt x variant grid
        names = pipe.variants if args.variant == "all" else [v.strip() for v in args.variant.split(",")]
        unknown = [v for v in names if v not in pipe.variants]
        if unknown:
            raise ValueError(f"--variant {args.variant}: {model_dir} serves {pipe.variants}, not {unknown}")
    if args.base:
        pipe.use_base()
    _ = pipe.text_encoder  # load now, so the timing the caller takes after this is generation only
    return pipe, names, several


def _run_torch(args, pipe, prompts, names, several):
    """``(images, captions, grid columns, seconds per variant)``; with several variants the images are a
    grid: row = prompt, column = variant (same seed: the same noise for every variant)."""
    height, width = args.size if args.size else (None, None)
    per_variant, seconds = [], {}
    for name in names:
        if several:
            pipe.set_variant(name)
            if args.base:
                pipe.use_base()
        tv = time.perf_counter()
        per_variant.append(pipe(prompts, steps=args.steps, guidance=args.cfg, seed=args.seed, height=height,
                                width=width, progress=not args.no_progress))
        seconds[name] = time.perf_counter() - tv
    if several:
        images, captions = variant_grid(per_variant, prompts, names)
        return images, captions, len(names), seconds
    return per_variant[0], prompts, None, seconds
