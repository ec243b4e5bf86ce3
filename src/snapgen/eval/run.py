"""``snapgen eval``: SceneEval per category, the alignment score and the Fréchet distance of a pipeline,
with a report folder (markdown table, JSON, failure grids) that a person can look at.

Images: every prompt of the prompt set x ``seeds`` seeds (seed = 0..seeds-1). The Fréchet distance
compares the generated images with as many real scene renders (``SceneDataset(split="val")``) on the
features of the project's own image encoder; alignment is the cosine similarity of each generated image
with its prompt in that encoder's joint space with MiniLM. Both are skipped (reported as ``null``) when
the image encoder's weights are not present.

The summary records what was actually loaded -- the model folder (absolute; ``--model``, else
``$SNAPGEN_MODEL``, else the shipped one), the detector, image encoder and text encoder folders -- and under
``environment`` :func:`snapgen.env.describe` (versions, threads, CPU, the BNA backend ``auto`` chose and why).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["run_evaluation", "format_report"]


def run_evaluation(model_dir=None, prompts_path=None, seeds: int = 4, steps: int | None = None,
                   guidance: float | None = None, quick: bool = False, out_dir: str | Path = "eval_report",
                   batch_size: int = 36, progress: bool = True, variant: str | None = None,
                   base: bool = False, pipe=None, device=None, dtype=None) -> dict:
    """Generate the prompt set's images and score them. ``pipe``: any generator with
    ``pipe(prompts, seed=...) -> images`` (e.g. an ONNX / ExecuTorch export, or a quantized pipeline)
    instead of loading ``model_dir``; its sampler settings are its own. ``device`` / ``dtype``: where the loaded
    pipeline runs (``None``: auto / fp32; :mod:`snapgen.utils.device`); scoring runs on the CPU."""
    from ..utils.device import resolve_device, resolve_dtype

    from .. import env
    from ..data.scenes import SceneDataset
    from ..pipelines import TextToImagePipeline
    from .detector import default_detector_dir, load_detector
    from .sceneeval import evaluate_images, load_prompts, prompt_path, summarize, write_failure_grids

    t0 = time.perf_counter()
    external = pipe is not None
    if external:
        model_dir = model_dir or getattr(pipe, "directory", None)
    else:
        model_dir = Path(model_dir) if model_dir is not None else env.model_dir()
        pipe = TextToImagePipeline.from_pretrained(model_dir, variant=variant)
        device = resolve_device(device)
        pipe.to(device, resolve_dtype(dtype, device))
        if base:
            pipe.use_base()
    loaded = {"model": _absolute(model_dir), "detector": _absolute(default_detector_dir())}
    detector = load_detector(loaded["detector"])
    prompts = load_prompts(prompts_path or prompt_path("sceneeval"))
    if quick:  # 3 prompts per category, one seed: a couple of minutes on 2 cores
        kept: dict[str, list] = {}
        for p in prompts:
            if len(kept.setdefault(p["tag"], [])) < 3:
                kept[p["tag"]].append(p)
        prompts = [p for group in kept.values() for p in group]
        seeds = 1
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if external:
        meta = getattr(pipe, "meta", {})
        settings = {"steps": meta.get("steps"), "guidance": meta.get("guidance"), "sampler": meta.get("sampler")}
        steps, guidance = settings["steps"], settings["guidance"]
    else:
        settings = pipe.sampling_settings()
        steps = settings["steps"] if steps is None else steps
        guidance = settings["guidance"] if guidance is None else guidance
    images, metadata = [], []
    jobs = [(seed, prompts[i:i + batch_size]) for seed in range(seeds) for i in range(0, len(prompts), batch_size)]
    for seed, chunk in tqdm(jobs, desc="generating", disable=not progress):
        texts = [p["prompt"] for p in chunk]
        images += pipe(texts, seed=seed) if external else pipe(texts, steps=steps, guidance=guidance, seed=seed)
        metadata += chunk
    if not external:  # the pipeline's own text encoder (loaded by the first generation)
        loaded["text_encoder"] = _absolute(getattr(pipe.text_encoder, "path", None))
    results = evaluate_images(images, metadata, detector)
    scene = {k: round(v, 4) for k, v in summarize(results).items()}

    alignment = fd = None
    notes = []
    try:
        from .alignment import alignment_score, default_image_encoder_dir, load_image_encoder
        from .frechet import fd_images

        encoder_dir = _absolute(default_image_encoder_dir())
        encoder = load_image_encoder(encoder_dir)
        loaded["image_encoder"] = encoder_dir
        if external:
            from ..pipelines.text_to_image import load_text_encoder

            text_encoder = load_text_encoder("minilm", 32)
            loaded["alignment_text_encoder"] = _absolute(getattr(text_encoder, "path", None))
        else:
            text_encoder = pipe.text_encoder
        alignment = round(float(alignment_score(encoder, images, [m["prompt"] for m in metadata],
                                                text_encoder)["mean"]), 4)
        H, W = images[0].size[1], images[0].size[0]
        real = [s.image for s in (SceneDataset(resolution=(H, W), length=len(images), split="val")[i]
                                  for i in range(len(images)))]
        fd = round(float(fd_images(encoder, images, real)), 4)
    except (ImportError, FileNotFoundError) as e:
        notes.append(f"alignment and FD skipped: {e}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = write_failure_grids(results, images, out_dir / "failures")
    summary = {"sceneeval": scene, "alignment": alignment, "fd": fd, "steps": steps, "cfg": guidance,
               "images": len(images), "prompts": len(prompts), "seeds": seeds,
               "seconds": round(time.perf_counter() - t0, 1),
               **{"image_encoder": None, "text_encoder": None, **loaded},
               "variant": getattr(pipe, "variant", None) or getattr(pipe, "meta", {}).get("variant"),
               "sampler": settings["sampler"],
               "device": None if external else str(pipe.device),
               "dtype": None if external else str(pipe.dtype).removeprefix("torch."),
               "notes": notes,
               "environment": env.describe(_bna_backends(pipe))}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out_dir / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    (out_dir / "report.md").write_text(format_report(summary, grids))
    return summary


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _bna_backends(pipe):
    """The ``bna_backend`` of a torch pipeline's transformer (``None`` for exported graphs: not known here)."""
    from ..attention.backend import modules_backend

    return modules_backend(getattr(pipe, "transformer", None) or {})


def format_report(summary: dict, grids: dict | None = None) -> str:
    s = summary["sceneeval"]
    cats = [k for k in s if k != "overall"]
    lines = ["# snapgen eval", "",
             f"{summary['images']} images ({summary['prompts']} prompts x {summary['seeds']} seeds), "
             f"{summary['steps']} steps, CFG {summary['cfg']}, {summary['seconds']} s"
             + (f", variant {summary['variant']}" if summary.get("variant", "full") != "full" else ""), "",
             "| " + " | ".join(cats + ["overall", "alignment", "FD"]) + " |",
             "|" + "---|" * (len(cats) + 3),
             "| " + " | ".join(f"{s[c]:.3f}" for c in cats) + f" | **{s['overall']:.3f}** | "
             + ("-" if summary["alignment"] is None else f"{summary['alignment']:.3f}") + " | "
             + ("-" if summary["fd"] is None else f"{summary['fd']:.3f}") + " |", ""]
    loaded = [(k, summary.get(k)) for k in ("model", "detector", "image_encoder", "text_encoder") if summary.get(k)]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in loaded]
    attention = summary.get("environment", {}).get("numerics", {}).get("attention")
    if attention:
        chosen = ", ".join(sorted(set(attention["auto_choices"].values()))) or "-"
        lines.append(f"- BNA backend: requested {attention['requested']}, fused kernel {attention['kernel_status']}"
                     f", auto ran {chosen}")
    if loaded or attention:
        lines.append("")
    for n in summary.get("notes", []):
        lines.append(f"Note: {n}")
    if grids:
        lines += ["", "## Failures", ""]
        lines += [f"![{tag}](failures/{Path(p).name})" for tag, p in grids.items()]
    return "\n".join(lines) + "\n"
