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


def cmd_train(args) -> int:
    from .train import Trainer, TrainingDiverged, load_config

    overrides = {}
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.steps:
        overrides["steps"] = args.steps
    cfg = load_config(args.config, overrides)
    method = getattr(args, "method", None)
    if method is not None:  # snapgen distill <method>: the config must describe that method
        ok = (cfg.task == "flow" and bool(cfg.kd)) if method == "kd" else cfg.task == method
        if not ok:
            want = "task: flow with a kd: section" if method == "kd" else f"task: {method}"
            raise ValueError(f"snapgen distill {method} needs a config with {want}; {args.config} has task "
                             f"{cfg.task!r}" + (" and no kd: section" if cfg.task == "flow" else ""))
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


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"prompts file not found: {args.prompts_file}")
        with open(args.prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("no prompt given: snapgen generate \"a red circle to the left of a blue square\" "
                         "(or --prompts-file FILE with one prompt per line)")
    return prompts


def cmd_generate(args) -> int:
    from pathlib import Path

    from .pipelines import TextToImagePipeline, default_model_dir
    from .pipelines.text_to_image import make_grid

    prompts = _read_prompts(args)
    for p in prompts:
        if not p.strip():
            raise ValueError('empty prompt: describe the image, e.g. "a red circle to the left of a blue square"')
    if args.size is not None and len(args.size) != 2:
        raise ValueError("--size takes two numbers: HEIGHT WIDTH")
    height, width = args.size if args.size else (None, None)
    model_dir = Path(args.model) if args.model else default_model_dir()
    t0 = time.perf_counter()
    if args.backend in ("onnx", "executorch"):
        from .export.mobile import ExecuTorchPipeline
        from .export.onnx import OnnxPipeline

        if not args.model:
            raise ValueError(f"--backend {args.backend} needs --model EXPORT_DIR (a folder from "
                             f"`snapgen export {args.backend}`)")
        fixed = [f for f, v in (("--steps", args.steps), ("--cfg", args.cfg), ("--size", args.size),
                                ("--variant", args.variant)) if v is not None] + (["--base"] if args.base else [])
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change an exported model (its variant, size, sampler "
                             f"and guidance are fixed at export time); export again with the settings you want")
        pipe = (OnnxPipeline if args.backend == "onnx" else ExecuTorchPipeline)(model_dir)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        images = pipe(prompts, seed=args.seed)
    else:
        several = args.variant is not None and (args.variant == "all" or "," in args.variant)
        pipe = TextToImagePipeline.from_pretrained(model_dir, variant=None if several else args.variant)
        names = [pipe.variant]
        if several:  # one supernetwork, several sub-networks: a prompt x variant grid
            names = pipe.variants if args.variant == "all" else [v.strip() for v in args.variant.split(",")]
            unknown = [v for v in names if v not in pipe.variants]
            if unknown:
                raise ValueError(f"--variant {args.variant}: {model_dir} serves {pipe.variants}, not {unknown}")
        if args.base:
            pipe.use_base()
        _ = pipe.text_encoder  # load now, so the timing below is generation only
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
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
        if several:  # row = prompt, column = variant (same seed: the same noise for every variant)
            images = [per_variant[j][i] for i in range(len(prompts)) for j in range(len(names))]
            prompts = [f"{names[j]}: {prompts[i]}" for i in range(len(prompts)) for j in range(len(names))]
            args.grid_cols = len(names)
        else:
            images = per_variant[0]
    t_gen = time.perf_counter() - t1
    out = Path(args.out)
    written = []
    if out.suffix:  # a file: one image, or the grid of all
        if len(prompts) > 1 and not args.grid:
            raise ValueError(f"{len(prompts)} prompts need --out to be a folder (got {out}) or --grid")
        out.parent.mkdir(parents=True, exist_ok=True)
        (make_grid(images, prompts, cols=getattr(args, "grid_cols", None), scale=args.scale, caption_height=40)
         if args.grid else images[0]).save(out)
        written.append(out)
    else:  # a folder: one PNG per prompt (+ grid.png with --grid)
        out.mkdir(parents=True, exist_ok=True)
        for i, (im, p) in enumerate(zip(images, prompts)):
            slug = "".join(c if c.isalnum() else "_" for c in p.lower())[:48].strip("_")
            target = out / f"{i:02d}_{slug}.png"
            im.save(target)
            written.append(target)
        if args.grid:
            make_grid(images, prompts, cols=getattr(args, "grid_cols", None), scale=args.scale,
                      caption_height=40).save(out / "grid.png")
            written.append(out / "grid.png")
    for w in written:
        print(w)
    if args.backend == "torch" and len(seconds) > 1:
        print("per variant: " + ", ".join(f"{k} {v / (len(images) // len(seconds)):.2f} s per image"
                                          for k, v in seconds.items()))
    variant = pipe.meta["variant"] if args.backend != "torch" else "/".join(seconds)
    print(f"generated {len(images)} image(s) of {images[0].size[1]}x{images[0].size[0]} "
          f"{'with the ' + variant + ' variant ' if variant != 'full' else ''}"
          f"{'(' + {'onnx': 'onnxruntime', 'executorch': 'ExecuTorch'}[args.backend] + ') ' if args.backend != 'torch' else ''}"
          f"in {t_gen:.2f} s "
          f"({t_gen / len(images):.2f} s per image; model load {t_load:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from .eval.run import format_report, run_evaluation

    summary = run_evaluation(args.model, args.prompts, seeds=args.seeds, steps=args.steps, guidance=args.cfg,
                             quick=args.quick, out_dir=args.out, progress=not args.no_progress,
                             variant=args.variant, base=args.base)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary))
        print(f"report: {args.out}/report.md")
    return 0


def cmd_extract(args) -> int:
    from pathlib import Path

    import torch

    from .pipelines import TextToImagePipeline

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
    from .distill.combine import combine_adapters, parse_source
    from .pipelines import TextToImagePipeline

    out = combine_adapters([parse_source(s) for s in args.sources], args.out)
    pipe = TextToImagePipeline.from_pretrained(out)  # a folder that loads, or an error now rather than later
    print(f"wrote {out}: adapters {pipe.config.adapters}")
    return 0


def cmd_export(args) -> int:
    from .pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model, variant=args.variant)
    if args.base:
        pipe.use_base()
    res = _parse_resolution(args.resolution) if args.resolution else None
    if args.format == "onnx":
        from .export.onnx import export_onnx

        out = export_onnx(pipe, args.out, resolution=res, rewrite=args.rewrite)
    elif args.format == "executorch":
        from .export.mobile import export_executorch

        out = export_executorch(pipe, args.out, resolution=res)
    else:
        from .export.mobile import export_coreml

        out = export_coreml(pipe, args.out, resolution=res)
        print(f"Core ML packages written to {out}; running them needs macOS (coremltools predict / Xcode)")
        return 0
    print(f"generate with: snapgen generate \"a red circle\" --backend {args.format} --model {out}")
    return 0


def cmd_quantize(args) -> int:
    from .export.quantize import quantize_pipeline
    from .pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model, variant=args.variant)
    if args.base:
        pipe.use_base()
    if args.prompts_file:
        prompts = _read_prompts(argparse.Namespace(prompt=[], prompts_file=args.prompts_file))
    else:
        from .eval.sceneeval import load_prompts, prompt_path

        prompts = [p["prompt"] for p in load_prompts(prompt_path("sceneeval"))][::4][:16]
    out = quantize_pipeline(pipe, args.out, prompts, args.bits, args.finetune_steps)
    import os

    size = os.path.getsize(out / "transformer" / "quantized.safetensors")
    fp32 = 4 * pipe.extract(pipe.variant).transformer.num_parameters()
    print(f"{out}: transformer {size / 1e6:.2f} MB ({fp32 / size:.1f}x smaller than fp32 {fp32 / 1e6:.2f} MB)")
    return 0


def cmd_consolidate(args) -> int:
    """Sharded (DCP) checkpoint of an FSDP run -> the standard safetensors checkpoint + an exported folder."""
    from pathlib import Path

    from .train import Trainer, load_config
    from .train.checkpoint import list_checkpoints

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


def cmd_bench(args) -> int:
    from pathlib import Path

    from .export.device_report import device_report, format_report

    if args.what != "device":
        raise ValueError("snapgen bench supports: device")
    report = device_report(args.model, args.variants, args.backends, args.precisions, args.work,
                           _parse_resolution(args.resolution) if args.resolution else None, args.eval, args.repeats,
                           progress=(lambda *_: None) if args.json else print)
    table = format_report(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "device.md").write_text("# Device report\n\n" + report["note"] + "\n\n" + table + "\n")
    print(json.dumps(report, indent=2) if args.json else table)
    return 0


def cmd_data(args) -> int:
    if args.action == "encode":
        return _data_encode(args)
    from .data.shards import pack_shards

    src = args.source
    if src in ("scenes", "emoji"):
        from .data import build_dataset

        spec = {"type": src, "resolution": args.resolution, **({"length": args.limit or 10000} if src == "scenes"
                                                              else {})}
        dataset = build_dataset(spec)
    else:
        from .data.folder import ImageFolderDataset

        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} is neither a built-in source (scenes, emoji) nor a folder")
        dataset = ImageFolderDataset(src, resolution=args.resolution or None)
    out = pack_shards(dataset, args.out, args.shard_size, args.limit)
    index = json.loads((out / "index.json").read_text())
    print(f"{index['total']} samples in {len(index['shards'])} shards -> {out}")
    return 0


def _data_encode(args) -> int:
    """Image shards -> latent shards (VAE latents + caption features), optionally in aspect buckets."""
    from .data.buckets import aspect_buckets
    from .data.latent_shards import encode_shards
    from .pipelines.text_to_image import load_text_encoder
    from .vae import load_autoencoder

    if not os.path.isfile(os.path.join(args.source, "index.json")):
        raise FileNotFoundError(f"{args.source} is not a shard folder (no index.json); pack images first with "
                                f"`snapgen data pack SRC --out {args.source}`")
    vae_dir = args.vae
    if os.path.isfile(os.path.join(vae_dir, "pipeline.json")):  # a pipeline folder: use its autoencoder
        vae_dir = os.path.join(vae_dir, "vae")
    vae = load_autoencoder(vae_dir).eval()
    text = load_text_encoder(args.text, args.text_max_length)
    buckets = None
    if args.buckets:
        factor = int(getattr(vae, "factor", 8))
        multiple = args.multiple or factor * 4  # pixels per Middle-stage token: VAE factor x patch 2 x merge 2
        buckets = aspect_buckets(args.buckets, multiple, args.max_ratio)
        print(f"{len(buckets)} aspect buckets around {args.buckets}^2 px (sides multiples of {multiple}): "
              + ", ".join(f"{h}x{w}" for h, w in buckets))
    out = encode_shards(args.source, args.out, vae, text, buckets=buckets,
                        resolution=None if buckets else (args.resolution or None), batch_size=args.batch_size)
    index = json.loads((out / "index.json").read_text())
    print(f"{index['total']} samples ({index['skipped']} skipped) in {len(index['shards'])} latent shards -> "
          f"{out}; grids {index['sizes']}. Train on them with data.shards: {out}")
    return 0


def cmd_plan(args) -> int:
    from .models import ThreeStageDiTConfig, preset
    from .train import load_config
    from .train.plan import plan_memory

    cfg = load_config(args.config)
    if cfg.task != "flow":
        raise ValueError(f"snapgen plan reads flow-training configs; {args.config} has task {cfg.task!r}")
    kw = {k: v for k, v in cfg.model.items() if k != "init_from"}
    name = kw.pop("preset", None)
    mcfg = preset(name, **kw) if name else ThreeStageDiTConfig(**kw)
    res = args.resolution or cfg.data.get("resolution", 256)
    res = res if isinstance(res, int) else int(res[0])
    strategy = args.strategy or cfg.distributed.get("strategy", "ddp")
    batch = args.batch_per_gpu or cfg.batch_size
    widths = ["full"]
    if mcfg.elastic_variants:  # the sandwich rule: full + smallest + num_random others, every step
        ranked = sorted(mcfg.elastic_variants, key=lambda v: v[1])
        widths += [ranked[0][0]] + [n for n, _ in ranked[1:][: int(cfg.elastic.get("num_random", 1))]]
    plans = [plan_memory(mcfg, res, args.text_len, g, batch, strategy, cfg.grad_checkpointing, widths=widths)
             for g in args.gpus]
    if args.json:
        print(json.dumps([{**p.__dict__, "total_gib": p.total_gib} for p in plans], indent=2))
    else:
        print(f"{args.config}: {res}x{res} px, {args.text_len} text tokens, gradient checkpointing "
              f"{'on' if cfg.grad_checkpointing else 'off'}, widths per step: {', '.join(widths)}")
        for p in plans:
            print(p.table())
    return 0


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ValueError(f"resolution must be N or HxW in pixels, e.g. 64 or 64x96; got {text!r}")
    return parts[0], parts[1]


def cmd_select(args) -> int:
    import torch

    from .elastic.select import measure_step_latency, select_variant
    from .models.dit import check_latent_size
    from .pipelines import TextToImagePipeline

    if args.budget_ms <= 0:
        raise ValueError(f"--budget-ms must be positive, got {args.budget_ms}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    H, W = _parse_resolution(args.resolution)
    f = pipe.vae_factor
    if H % f or W % f:
        raise ValueError(f"resolution {H}x{W} is not a multiple of the VAE factor {f}")
    cfg = pipe.transformer.config
    check_latent_size(H // f, W // f, cfg.downsample, cfg.vae_factor)
    rows = {}
    for name in pipe.variants:
        m = measure_step_latency(pipe.transformer, name, (H // f, W // f), text_len=pipe.config.text_max_length,
                                 repeats=args.repeats)
        rows[name] = {"ratio": pipe.transformer.variants[name],
                      "params": pipe.extract(name).transformer.num_parameters(), **m}
    chosen = select_variant({n: r["median_ms"] for n, r in rows.items()}, pipe.transformer.variants,
                            args.budget_ms)
    result = {"budget_ms": args.budget_ms, "resolution": [H, W], "threads": torch.get_num_threads(),
              "selected": chosen, "variants": rows,
              "latency": "one denoiser call on 1 image with CFG (batch 2), median over repeats"}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"per-step latency at {H}x{W} on this machine ({torch.get_num_threads()} threads, CFG batch 2):")
        print(f"{'variant':8s} {'width':>6s} {'params':>9s} {'median ms':>10s}")
        for name, r in rows.items():
            mark = "  <- selected" if name == chosen else ""
            print(f"{name:8s} {r['ratio']:6.3f} {r['params'] / 1e6:8.2f}M {r['median_ms']:10.2f}{mark}")
        if chosen is None:
            print(f"no variant fits {args.budget_ms} ms per step; the smallest takes "
                  f"{min(r['median_ms'] for r in rows.values()):.2f} ms")
    return 0 if chosen is not None else 1


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

    p = sub.add_parser("train", help="train a model from a YAML config (resumes automatically)")
    p.add_argument("--config", required=True, help="configs/<name>.yaml")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps (a resumed run may be extended)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a trained model: kd (from a teacher), dmd (plain DMD2 to a "
                                      "few-step LoRA), kdmd (K-DMD); resumes automatically")
    p.add_argument("method", choices=["kd", "dmd", "kdmd"])
    p.add_argument("--config", required=True, help="configs/distill/<name>.yaml")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images from text prompts")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="SceneEval per category, alignment score and FD of a model, with a report")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extract", help="write one elastic sub-network as a standalone pipeline folder")
    p.add_argument("--model", help="elastic pipeline folder (default: the shipped model)")
    p.add_argument("--variant", required=True, help="tiny | small | full")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="saved weight dtype")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("combine-adapters", help="one distilled pipeline from the few-step adapters of several runs "
                                              "on the same base model (e.g. full from one run, tiny/small from another)")
    p.add_argument("sources", nargs="+", help="DIR (all its variants) or DIR:tiny,small (those only); later wins")
    p.add_argument("--out", required=True, help="output pipeline folder (replaced)")
    p.set_defaults(func=cmd_combine_adapters)

    p = sub.add_parser("export", help="export a pipeline for deployment (ONNX: text encoder, DiT step, decoder)")
    p.add_argument("format", choices=["onnx", "executorch", "coreml"])
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--variant", help="elastic sub-network to export (default: the pipeline's default)")
    p.add_argument("--resolution", help="image size in pixels, N or HxW (default: the model's)")
    p.add_argument("--base", action="store_true", help="distilled models: export the base (teacher) sampler")
    p.add_argument("--rewrite", action="store_true",
                   help="onnx: use the on-device graph form (BNA as gathers + batched attention); "
                        "executorch/coreml always do")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="k-means weight quantization of one variant (SnapGen++: ~4.3 bits)")
    p.add_argument("--model", help="pipeline folder (default: the shipped model)")
    p.add_argument("--variant", help="elastic sub-network (default: the pipeline's default)")
    p.add_argument("--bits", type=float, default=4.3, help="target mean bits per clustered weight (4-8)")
    p.add_argument("--finetune-steps", type=int, default=100, help="self-distillation steps for biases/norms")
    p.add_argument("--prompts-file", help="calibration prompts, one per line (default: 16 SceneEval prompts)")
    p.add_argument("--base", action="store_true", help="distilled models: quantize the base (teacher) model")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("consolidate", help="turn an FSDP run's sharded checkpoint into the safetensors format")
    p.add_argument("--config", required=True, help="the run's training config")
    p.add_argument("--no-export", action="store_true", help="only rewrite the checkpoint")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("bench", help="device report: latency, memory, size (and quality) per variant and backend")
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

    p = sub.add_parser("data", help="data tools: pack a source into WebDataset-style tar shards; encode shards "
                                    "into latent shards (VAE latents + text features, optional aspect buckets)")
    p.add_argument("action", choices=["pack", "encode"])
    p.add_argument("source", help="pack: scenes | emoji | an image folder (image + .txt caption); "
                                  "encode: a folder of image shards")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="pack: samples per shard")
    p.add_argument("--limit", type=int, help="pack at most N samples")
    p.add_argument("--resolution", type=int, default=64,
                   help="square size in pixels; 0 keeps each image's own size (pack a folder for aspect buckets)")
    p.add_argument("--vae", default="models/snapgen-micro",
                   help="encode: an autoencoder folder or a pipeline folder (its vae/)")
    p.add_argument("--text", default="minilm", help="encode: text encoder (minilm or a local folder)")
    p.add_argument("--text-max-length", type=int, default=32)
    p.add_argument("--buckets", type=int, help="encode: aspect buckets of about BUCKETS^2 pixels each")
    p.add_argument("--multiple", type=int, help="encode: bucket sides are multiples of this (default VAE factor x 4)")
    p.add_argument("--max-ratio", type=float, default=2.0, help="encode: most elongated bucket (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="encode: images per autoencoder batch")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("plan", help="per-GPU memory of a training config for N GPUs (meta-device dry run)")
    p.add_argument("--config", required=True, help="a flow training config")
    p.add_argument("--gpus", type=int, nargs="+", default=[8], help="GPU counts to plan for (default 8)")
    p.add_argument("--batch-per-gpu", type=int, help="per-GPU batch (default: the config's batch_size)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: the config's distributed.strategy")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the config's)")
    p.add_argument("--text-len", type=int, default=300, help="text tokens (default 300)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("select", help="measure each variant's per-step latency here; pick the widest within a budget")
    p.add_argument("--budget-ms", type=float, required=True, help="latency budget per sampling step, ms")
    p.add_argument("--resolution", default="64", help="image size in pixels, N or HxW (default 64)")
    p.add_argument("--model", help="elastic pipeline folder (default: the shipped model)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median is used)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError, ImportError) as e:
        print(f"snapgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
