"""``snapgen generate``: images from text prompts (PyTorch pipeline, or an ONNX / ExecuTorch export); with
``--geneval-metadata FILE --outdir DIR --n-samples N``, GenEval's folder layout for any GenEval prompt file
(issue 20 §4; :mod:`snapgen.eval.geneval_layout`: sample k has seed ``--seed`` + k, resumable)."""

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
    p.add_argument("--geneval-metadata", metavar="FILE",
                   help="GenEval metadata JSONL (one prompt per line, any classes): write GenEval's layout "
                        "(--outdir DIR: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png, ...) for its "
                        "official evaluator or snapgen eval --images; sample k has seed --seed + k; resumable")
    p.add_argument("--outdir", help="with --geneval-metadata: the layout's root folder")
    p.add_argument("--n-samples", type=int, default=4, help="with --geneval-metadata: samples per prompt (default 4)")
    add_device_args(p)
    p.add_argument("--stage-steps", type=int, nargs="+", metavar="N",
                   help="DFM models: sampling steps per pyramid stage, coarsest first (default: the model's)")
    p.add_argument("--preview", action="store_true",
                   help="DFM models: also write each stage's coarse preview as soon as the stage ends "
                        "(OUT_preview1.png, ...; a folder OUT gets preview_stage1/ ...) and report when it came")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from pathlib import Path

    from ..pipelines import default_model_dir

    if args.geneval_metadata or args.outdir:
        return _cmd_geneval(args)
    prompts = read_prompts(args.prompt, args.prompts_file)
    for p in prompts:
        if not p.strip():
            raise ValueError('empty prompt: describe the image, e.g. "a red circle to the left of a blue square"')
    if args.size is not None and len(args.size) != 2:
        raise ValueError("--size takes two numbers: HEIGHT WIDTH")
    model_dir = Path(args.model) if args.model else default_model_dir()
    t0 = time.perf_counter()
    exported = args.backend in ("onnx", "executorch")
    if exported and (args.preview or args.stage_steps):
        raise ValueError("--preview / --stage-steps run with --backend torch (an export's sampler is fixed at "
                         "export time; its DiT graph samples every stage as exported)")
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


def _cmd_geneval(args) -> int:
    """``--geneval-metadata FILE --outdir DIR --n-samples N``: GenEval's layout, one image per call (module
    docstring of :mod:`snapgen.eval.geneval_layout`)."""
    from pathlib import Path

    from ..eval.geneval_layout import read_geneval_metadata, write_layout
    from ..pipelines import default_model_dir

    if not (args.geneval_metadata and args.outdir):
        raise ValueError("--geneval-metadata FILE and --outdir DIR go together (GenEval's layout is written to DIR)")
    others = [f for f, v in (("prompts", args.prompt), ("--prompts-file", args.prompts_file)) if v] \
        + (["--grid"] if args.grid else []) + (["--out"] if args.out != "out.png" else [])
    if others:
        raise ValueError(f"{', '.join(others)} cannot go with --geneval-metadata (the prompts are the metadata "
                         f"file's, the images go to --outdir)")
    if args.variant is not None and (args.variant == "all" or "," in args.variant):
        raise ValueError("--geneval-metadata generates with one variant: --variant tiny | small | full")
    if args.size is not None and len(args.size) != 2:
        raise ValueError("--size takes two numbers: HEIGHT WIDTH")
    metadata = read_geneval_metadata(args.geneval_metadata)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if args.backend in ("onnx", "executorch"):
        pipe = _load_exported(args, model_dir)

        def one(prompt, seed):
            return pipe([prompt], seed=seed)[0]
    else:
        pipe = _load_torch(args, model_dir)[0]
        height, width = args.size if args.size else (None, None)

        def one(prompt, seed):
            return pipe([prompt], steps=args.steps, guidance=args.cfg, seed=seed, height=height, width=width)[0]
    t0 = time.perf_counter()
    done = write_layout(one, metadata, args.outdir, args.n_samples, base_seed=args.seed,
                        progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(f"{args.outdir}: {done['folders']} prompt folders x {args.n_samples} samples (seeds {args.seed}.."
          f"{args.seed + args.n_samples - 1}); generated {done['generated']}, kept {done['skipped']} existing, "
          f"in {seconds:.1f} s")
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
        kw = {}
        if args.stage_steps:
            kw["stage_steps"] = args.stage_steps
        if args.preview:
            if pipe.sampler_config().kind != "dfm":
                raise ValueError(f"--preview shows the coarse stages of a DFM model; {args.model or 'this model'} "
                                 f"samples with {pipe.sampler_config().kind!r} in one stage")
            kw["preview"] = _preview_writer(args, prompts, name if several else None)
        per_variant.append(pipe(prompts, steps=args.steps, guidance=args.cfg, seed=args.seed, height=height,
                                width=width, progress=not args.no_progress, **kw))
        seconds[name] = time.perf_counter() - tv
    if several:
        images, captions = variant_grid(per_variant, prompts, names)
        return images, captions, len(names), seconds
    return per_variant[0], prompts, None, seconds


def _preview_writer(args, prompts, variant):
    """The pipeline's ``preview`` callback: each stage's coarse images, written as they arrive."""
    from pathlib import Path

    out = Path(args.out)
    tag = f"_{variant}" if variant else ""

    def write(k, images, seconds):
        target = out.with_name(f"{out.stem}{tag}_preview{k + 1}{out.suffix}") if out.suffix else \
            out / f"preview_stage{k + 1}{tag}"
        files = write_images(images, prompts, target, grid=args.grid, cols=None, scale=args.scale)
        print(f"preview after stage {k + 1}: {seconds:.2f} s after sampling began -> {files[-1]}")

    return write
