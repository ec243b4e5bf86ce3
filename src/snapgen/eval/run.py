"""``snapgen eval``: SceneEval per category, the alignment score and the Fréchet distance of a pipeline,
with a report folder (markdown table, JSON, failure grids) that a person can look at.

Images: every prompt of the prompt set x ``seeds`` seeds (seed = 0..seeds-1), each from its own generator (the
image of cell (prompt, seed) is ``pipe([prompt], seed=seed)``'s, whatever it was batched with). The Fréchet distance
compares the generated images with as many real scene renders (``SceneDataset(split="val")``) on the
features of the project's own image encoder; alignment is the cosine similarity of each generated image
with its prompt in that encoder's joint space with MiniLM. Both are skipped (reported as ``null``) when
the image encoder's weights are not present.

The summary records what was actually loaded -- the model folder (absolute; ``--model``, else
``$SNAPGEN_MODEL``, else the shipped one), the detector, image encoder and text encoder folders -- and under
``environment`` :func:`snapgen.env.describe` (versions, threads, CPU, the BNA backend ``auto`` chose and why).

Two halves (issue 20 §3-4): :func:`generate_images` (prompt set x seeds through a pipeline) and
:func:`score_images` (SceneEval verdicts, alignment, FD, 95% intervals from :mod:`snapgen.eval.stats`, the report
folder), so :func:`evaluate_folder` can score images of any model in GenEval's layout
(:mod:`snapgen.eval.geneval_layout`). results.jsonl rows carry ``prompt_index`` (line of the prompt file),
``seed``, the verdict and the image's ``alignment`` cosine; :func:`compare_runs` pairs two runs on those cells.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from .report import format_comparison, format_report

__all__ = ["run_evaluation", "generate_images", "score_images", "evaluate_folder", "compare_runs", "load_run",
           "default_prompts_path", "resolve_prompts_path", "format_report", "format_comparison"]

N_BOOT = 2000
LEVEL = 0.95


def default_prompts_path() -> Path:
    """The prompt file ``snapgen eval`` uses without ``--prompts`` (the one place that decides it)."""
    from .headline import HEADLINE_SET
    from .sceneeval import prompt_path

    return prompt_path(HEADLINE_SET)


def resolve_prompts_path(prompts) -> Path:
    """``--prompts``: ``None`` = the headline set, a shipped set's name (``sceneeval``, ``headline``, ...), or a
    GenEval-format JSONL file."""
    from .sceneeval import PROMPT_SETS, prompt_path

    if prompts is None:
        return default_prompts_path()
    if str(prompts) in PROMPT_SETS and not Path(prompts).exists():
        return prompt_path(str(prompts))
    return Path(prompts)


def detector_card() -> dict | None:
    """``snapgen.eval.detector.load_detector_card()`` when the detector ships one (accuracy on renders, false
    objects on negatives and noise), else ``None``."""
    from . import detector

    load = getattr(detector, "load_detector_card", None)
    return None if load is None else load()


def select_prompts(prompts: list[dict], quick: bool, seeds: int) -> tuple[list[tuple[int, dict]], int]:
    """``([(prompt_index, metadata)], seeds)``: every prompt, or with ``quick`` the first 3 per category and one
    seed. ``prompt_index`` is the prompt's position in the file, kept so results of --quick and full runs align."""
    indexed = list(enumerate(prompts))
    if quick:  # 3 prompts per category, one seed: a couple of minutes on 2 cores
        kept: dict[str, list] = {}
        for i, p in indexed:
            if len(kept.setdefault(p["tag"], [])) < 3:
                kept[p["tag"]].append((i, p))
        indexed = [ip for group in kept.values() for ip in group]
        seeds = 1
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return indexed, seeds


def generate_images(pipe, prompts: list[tuple[int, dict]], seeds: int, steps=None, guidance=None,
                    external: bool = False, batch_size: int = 36, progress: bool = True):
    """``(images, metadata, cells)`` for every prompt x seed 0..seeds-1, generated in batches of prompts sharing
    a seed; ``cells[i] = (prompt_index, seed)`` of image ``i``. Every image has its own generator
    (``seed=[s] * len(batch)``), so cell ``(p, s)`` is the image ``pipe([p], seed=s)`` gives -- ``snapgen generate p
    --seed s``, sample ``s`` of ``generate --geneval-metadata`` -- whatever else is in its batch (up to the rounding
    of batched matmuls). ``pipe`` must accept a list of seeds (``TextToImagePipeline`` and the exported runtimes
    do)."""
    images, metadata, cells = [], [], []
    jobs = [(seed, prompts[i:i + batch_size]) for seed in range(seeds) for i in range(0, len(prompts), batch_size)]
    for seed, chunk in tqdm(jobs, desc="generating", disable=not progress):
        texts = [p["prompt"] for _, p in chunk]
        per_image = [seed] * len(texts)  # one generator per image, all seeded `seed`: batch-independent noise
        images += pipe(texts, seed=per_image) if external else \
            pipe(texts, steps=steps, guidance=guidance, seed=per_image)
        metadata += [p for _, p in chunk]
        cells += [(i, seed) for i, _ in chunk]
    return images, metadata, cells



def run_evaluation(model_dir=None, prompts_path=None, seeds: int = 4, steps: int | None = None,
                   guidance: float | None = None, quick: bool = False, out_dir: str | Path = "eval_report",
                   batch_size: int = 36, progress: bool = True, variant: str | None = None,
                   base: bool = False, pipe=None, device=None, dtype=None, save_images=None) -> dict:
    """Generate the prompt set's images and score them (:func:`generate_images`, :func:`score_images`).
    ``save_images``: a folder to keep the images in GenEval's layout (re-scored by :func:`evaluate_folder`).
    ``pipe``: any generator with ``pipe(prompts, seed=[one int per prompt]) -> images`` (e.g. an ONNX /
    ExecuTorch export, or a quantized pipeline) instead of loading ``model_dir``; its sampler settings are its own. ``device`` /
    ``dtype``: where the loaded pipeline runs (``None``: auto / fp32; :mod:`snapgen.utils.device`); scoring runs
    on the CPU."""
    from ..utils.device import resolve_device, resolve_dtype

    from .. import env
    from ..pipelines import TextToImagePipeline
    from .sceneeval import load_prompts

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
    if save_images is not None:
        from .geneval_layout import require_empty

        require_empty(save_images)  # before generating anything
    prompts_path = resolve_prompts_path(prompts_path)
    indexed, seeds = select_prompts(load_prompts(prompts_path), quick, seeds)
    if external:
        meta = getattr(pipe, "meta", {})
        settings = {"steps": meta.get("steps"), "guidance": meta.get("guidance"), "sampler": meta.get("sampler")}
        steps, guidance = settings["steps"], settings["guidance"]
    else:
        settings = pipe.sampling_settings()
        steps = settings["steps"] if steps is None else steps
        guidance = settings["guidance"] if guidance is None else guidance
    images, metadata, cells = generate_images(pipe, indexed, seeds, steps, guidance, external, batch_size, progress)
    if save_images is not None:
        from .geneval_layout import write_images

        write_images(images, metadata, cells, save_images)
    loaded = {"model": _absolute(model_dir)}
    alignment_encoder = None
    if not external:  # the pipeline's own text encoder(s) (loaded by the first generation)
        encoders = getattr(pipe, "text_encoders", None) or [pipe.text_encoder]
        paths = [_absolute(getattr(e, "path", None)) for e in encoders]
        loaded["text_encoder"] = paths[0] if len(paths) == 1 else paths
        # the alignment score embeds prompts with MiniLM: the pipeline's encoder (one), or its MiniLM among several
        alignment_encoder = encoders[0] if len(encoders) == 1 else \
            next((e for e in encoders if getattr(e, "name", None) == "all-MiniLM-L6-v2"), None)
    extra = {"steps": steps, "cfg": guidance, "prompt_set": _absolute(prompts_path),
             "variant": getattr(pipe, "variant", None) or getattr(pipe, "meta", {}).get("variant"),
             "sampler": settings["sampler"],
             # one generator per image (seed=[s] * batch); runs before this field used the batch's noise, drawn
             # together, so their images are not those of a run with it (docs/evaluation.md)
             "noise": "per_image",
             "device": None if external else str(pipe.device),
             "dtype": None if external else str(pipe.dtype).removeprefix("torch."),
             "bna": _bna_backends(pipe)}
    return score_images(images, metadata, cells, out_dir, loaded=loaded,
                        text_encoder=alignment_encoder, extra=extra, t0=t0)


def evaluate_folder(images_dir, out_dir: str | Path = "eval_report", progress: bool = True) -> dict:
    """SceneEval (+ alignment, FD, intervals) of a folder in GenEval's layout, images from any model
    (``snapgen eval --images``). Every folder's metadata must be scoreable by SceneEval (scene classes): the first
    that is not raises ``ValueError`` naming its folder. Seeds: the base seed recorded in the folder's
    ``snapgen_layout.json`` (0 without it) plus the sample index (:func:`~.geneval_layout.read_layout`)."""
    from PIL import Image

    from .geneval_layout import read_layout

    t0 = time.perf_counter()
    entries = read_layout(images_dir)
    images = []
    for e in tqdm(entries, desc="reading", disable=not progress):
        with Image.open(e["path"]) as im:
            images.append(im.convert("RGB"))
    root = Path(images_dir).resolve()
    extra = {"images_dir": str(root), "steps": None, "cfg": None, "prompt_set": str(root), "variant": None,
             "sampler": None, "device": None, "dtype": None, "bna": None}
    return score_images(images, [e["metadata"] for e in entries], [(e["prompt_index"], e["seed"]) for e in entries],
                        out_dir, loaded={"model": None}, extra=extra, t0=t0,
                        paths=[str(Path(e["path"]).resolve().relative_to(root)) for e in entries])


def score_images(images, metadata, cells, out_dir, loaded: dict, text_encoder=None, extra: dict | None = None,
                 t0: float | None = None, paths: list[str] | None = None) -> dict:
    """Score generated images (``cells[i] = (prompt_index, seed)`` of image ``i``), write the report folder
    (report.md, summary.json, results.jsonl, failures/) and return the summary. ``text_encoder``: the MiniLM
    encoder for alignment (``None``: load it)."""
    from .. import env
    from ..data.scenes import SceneDataset
    from .detector import default_detector_dir, load_detector
    from .sceneeval import evaluate_images, summarize, write_failure_grids
    from .stats import INTERVAL_METHOD, bootstrap_scores, score_table

    t0 = time.perf_counter() if t0 is None else t0
    extra = dict(extra or {})
    loaded = {**loaded, "detector": _absolute(default_detector_dir())}
    detector = load_detector(loaded["detector"])
    results = evaluate_images(images, metadata, detector)
    for r, (prompt_index, seed) in zip(results, cells):
        r["prompt_index"], r["seed"] = prompt_index, seed
    if paths is not None:
        for r, path in zip(results, paths):
            r["image"] = path
    scene = {k: round(v, 4) for k, v in summarize(results).items()}
    intervals = _rounded(bootstrap_scores(score_table(results)[0], n_boot=N_BOOT, level=LEVEL))

    alignment = fd = alignment_interval = None
    notes = []
    try:
        from .alignment import alignment_score, default_image_encoder_dir, load_image_encoder
        from .frechet import fd_images

        encoder_dir = _absolute(default_image_encoder_dir())
        encoder = load_image_encoder(encoder_dir)
        loaded["image_encoder"] = encoder_dir
        if text_encoder is None:
            from ..text.loading import load_text_encoder

            text_encoder = load_text_encoder("minilm", 32)
            loaded["alignment_text_encoder"] = _absolute(getattr(text_encoder, "path", None))
        per_image = alignment_score(encoder, images, [m["prompt"] for m in metadata], text_encoder)["per_image"]
        for r, a in zip(results, per_image):
            r["alignment"] = round(a, 5)
        alignment = round(float(sum(per_image) / len(per_image)), 4)
        alignment_interval = _rounded(bootstrap_scores(score_table(results, "alignment", by_tag=False)[0],
                                                       n_boot=N_BOOT, level=LEVEL))["all"]
        H, W = images[0].size[1], images[0].size[0]
        real = [s.image for s in (SceneDataset(resolution=(H, W), length=len(images), split="val")[i]
                                  for i in range(len(images)))]
        fd = round(float(fd_images(encoder, images, real)), 4)
    except (ImportError, FileNotFoundError) as e:
        notes.append(f"alignment and FD skipped: {e}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = write_failure_grids(results, images, out_dir / "failures")
    bna = extra.pop("bna", None)
    summary = {"sceneeval": scene, "intervals": intervals,
               "interval_method": INTERVAL_METHOD.format(n_boot=N_BOOT, level=LEVEL),
               "alignment": alignment, "alignment_interval": alignment_interval, "fd": fd,
               "fd_interval": None, "steps": extra.pop("steps", None), "cfg": extra.pop("cfg", None),
               "images": len(images), "prompts": len({c[0] for c in cells}), "seeds": len({c[1] for c in cells}),
               "seconds": round(time.perf_counter() - t0, 1),
               **{"image_encoder": None, "text_encoder": None, **loaded}, **extra,
               "detector_card": detector_card(), "notes": notes,
               "environment": env.describe(bna)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out_dir / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    (out_dir / "report.md").write_text(format_report(summary, grids))
    return summary


def load_run(path) -> tuple[dict | None, list[dict]]:
    """``(summary or None, result rows)`` of a report folder (summary.json + results.jsonl) or a results.jsonl."""
    path = Path(path)
    results = path / "results.jsonl" if path.is_dir() else path
    if not results.is_file():
        raise FileNotFoundError(f"{path}: not an eval report (no results.jsonl); pass a snapgen eval --out folder, "
                                f"its results.jsonl, or a model folder")
    summary_file = results.with_name("summary.json")
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    rows = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()]
    return summary, rows


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and not (path / "results.jsonl").exists() and (path / "pipeline.json").exists()


def compare_runs(a, b, out_dir: str | Path = "eval_compare", progress: bool = True, **eval_kwargs) -> dict:
    """``snapgen eval --compare A B``: each of A / B is a report folder (or its results.jsonl) or a model folder,
    which is first evaluated (``eval_kwargs`` of :func:`run_evaluation`, the same for both: same prompts and
    seeds) into ``out_dir/a`` / ``out_dir/b``. Writes compare.md and compare.json to ``out_dir``."""
    from .stats import INTERVAL_METHOD, compare_rows

    runs = []
    for name, path in (("a", Path(a)), ("b", Path(b))):
        if _is_model_folder(path):
            run_evaluation(path, out_dir=Path(out_dir) / name, progress=progress, **eval_kwargs)
            runs.append((str((Path(out_dir) / name).resolve()), *load_run(Path(out_dir) / name)))
        elif not path.exists():
            raise FileNotFoundError(f"--compare: {path} not found (a snapgen eval report folder or a model folder)")
        else:
            runs.append((str(path.resolve()), *load_run(path)))
    (pa, sa, ra), (pb, sb, rb) = runs
    scores = compare_rows(ra, rb, n_boot=N_BOOT, level=LEVEL)
    scores = {k: {m: (round(v, 5) if m in ("a", "b", "diff", "lo", "hi") else v) for m, v in r.items()}
              for k, r in scores.items()}  # p unrounded: it can be tiny
    comparison = {"a": pa, "b": pb, "scores": scores, "images": len(ra),
                  "prompts": len({r["prompt_index"] for r in ra}), "seeds": len({r["seed"] for r in ra}),
                  "interval_method": INTERVAL_METHOD.format(n_boot=N_BOOT, level=LEVEL),
                  "test": "McNemar exact (two-sided binomial test on the discordant images), pooled over prompts",
                  "fd": ({"a": sa.get("fd"), "b": sb.get("fd")} if sa and sb else None)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out_dir / "compare.md").write_text(format_comparison(comparison))
    return comparison


def _rounded(intervals: dict) -> dict:
    return {k: {m: round(v, 4) for m, v in d.items()} for k, d in intervals.items()}


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _bna_backends(pipe):
    """The ``bna_backend`` of a torch pipeline's transformer (``None`` for exported graphs: not known here)."""
    from ..attention.backend import modules_backend

    return modules_backend(getattr(pipe, "transformer", None) or {})
