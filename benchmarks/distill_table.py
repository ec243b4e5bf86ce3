"""The K-DMD table (issue 6 §4; SnapGen++ Table 4 on our data): for each elastic width, SceneEval per category,
alignment, FD and wall time per image of

  (a) the teacher: the base model's full width, 28 Euler steps, CFG 4;
  (b) the base student (that width, no adapter) at 28 steps with CFG 4, and at 4 steps with CFG 4;
  (c) plain DMD at 4 steps, no CFG (``configs/distill/dmd_students.yaml``);
  (d) K-DMD at 4 steps, no CFG (``configs/distill/kdmd.yaml``);

plus the few-step teacher (full width + its 4-step LoRA, ``configs/distill/fewstep_teacher.yaml``) for reference.
Every row is one ``run_evaluation`` (72 prompts x 4 seeds by default) whose report lands in
``runs/distill/eval/ROW/``; wall time = median of repeated single-image generations (text encoding, sampling and
decoding; 2 threads, fp32). Writes ``benchmarks/results/distill.{json,md}``.

    python benchmarks/distill_table.py [--variants tiny small] [--quick] [--reuse-eval]

Rows whose run has not produced ``final/`` yet are listed as missing (with the command that makes them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, median_ms, setup_torch, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = {"base": (None, "the base model: model.init_from of configs/distill/kdmd.yaml"),
        "kdmd": ("runs/distill/kdmd/final", "snapgen distill kdmd --config configs/distill/kdmd.yaml"),
        "dmd": ("runs/distill/dmd_students/final", "snapgen distill dmd --config configs/distill/dmd_students.yaml"),
        "fewstep": ("runs/distill/fewstep_teacher/final",
                    "snapgen distill dmd --config configs/distill/fewstep_teacher.yaml")}
CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
TIMING_PROMPT = "a red circle to the left of a blue square"


def rows_for(variants: list[str], extra: dict[str, str] | None = None) -> list[dict]:
    """Each row: which run's folder, which width, base (adapters off) or distilled, and the sampler settings
    (None = the pipeline's own: 28-step Euler + CFG 4 for the base, 4-step few-step sampler, no CFG, distilled)."""
    rows = [dict(key="teacher", label="(a) teacher (base full), 28 steps, CFG 4", run="base", variant="full",
                 base=True, steps=28, cfg=None),
            dict(key="fewstep_teacher", label="few-step teacher (full + LoRA), 4 steps", run="fewstep",
                 variant="full", base=False, steps=None, cfg=None)]
    for v in variants:
        rows += [dict(key=f"base28_{v}", label=f"(b) base {v}, 28 steps, CFG 4", run="base", variant=v, base=True,
                      steps=28, cfg=None),
                 dict(key=f"base4_{v}", label=f"(b) base {v}, 4 steps, CFG 4", run="base", variant=v, base=True,
                      steps=4, cfg=None),
                 dict(key=f"dmd_{v}", label=f"(c) DMD {v}, 4 steps", run="dmd", variant=v, base=False, steps=None,
                      cfg=None),
                 dict(key=f"kdmd_{v}", label=f"(d) K-DMD {v}, 4 steps", run="kdmd", variant=v, base=False,
                      steps=None, cfg=None)]
        rows += [dict(key=f"{name}_{v}", label=f"{name} {v}, 4 steps", run=name, variant=v, base=False, steps=None,
                      cfg=None) for name in (extra or {})]
    return rows


def same_base_eval(folder: Path, row: dict, steps: int, cfg: float, seeds: int) -> dict | None:
    """A base row's evaluation made earlier by ``benchmarks/elastic_variants.py --eval full`` (``runs/eval_variants/
    VARIANT``) on byte-identical base weights with the same settings, or None. Distilled pipelines keep the base
    transformer file unchanged (adapters live beside it), so the 28-step base rows need not be generated again."""
    import hashlib

    if not row["base"]:
        return None
    summary_file = REPO / "runs" / "eval_variants" / row["variant"] / "summary.json"
    if not summary_file.is_file():
        return None
    s = json.loads(summary_file.read_text())
    other = Path(s.get("model", "")) / "transformer" / "model.safetensors"
    if not (s.get("steps") == steps and s.get("cfg") == cfg and s.get("seeds") == seeds and other.is_file()
            and s.get("prompts") == 72):
        return None
    digest = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (other, folder / "transformer" / "model.safetensors")]
    return s if digest[0] == digest[1] else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["tiny", "small"])
    ap.add_argument("--quick", action="store_true", help="3 prompts per category, 1 seed (a smoke run)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--reuse-eval", action="store_true",
                    help="reuse runs/distill/eval/ROW/summary.json when it was made for the same row and settings")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=FOLDER",
                    help="more distilled runs to compare (e.g. kdmd_cosine=runs/distill/kdmd_cosine/final)")
    ap.add_argument("--repeats", type=int, default=5, help="single-image generations timed per row (0: skip timing, e.g. while other jobs run)")
    args = ap.parse_args()
    setup_torch()
    from snapgen.eval.run import run_evaluation
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.train import load_config

    payload = {"machine": machine(), "quick": args.quick, "seeds": 1 if args.quick else args.seeds, "rows": []}
    table, missing = [], []
    if any("=" not in e for e in args.extra):
        ap.error(f"--extra takes NAME=FOLDER pairs, got {args.extra}")
    extra = dict(e.split("=", 1) for e in args.extra)
    runs = {**RUNS, **{name: (folder, "its training command") for name, folder in extra.items()}}
    base_folder = load_config(REPO / "configs/distill/kdmd.yaml").model["init_from"]
    for row in rows_for(args.variants, extra):
        folder, command = runs[row["run"]]
        folder = REPO / (folder or base_folder)
        if not (folder / "pipeline.json").is_file():
            missing.append(f"{row['label']}: {folder.relative_to(REPO)} not found; run `{command}`")
            continue
        adapters = json.loads((folder / "pipeline.json").read_text()).get("adapters") or {}
        if not row["base"] and row["variant"] not in adapters:  # e.g. a run that distilled only tiny and small
            missing.append(f"{row['label']}: {folder.relative_to(REPO)} has no {row['variant']} adapter")
            continue
        pipe = TextToImagePipeline.from_pretrained(folder, variant=row["variant"])
        if row["base"] and pipe.distilled:
            pipe.use_base()
        settings = pipe.sampling_settings()
        steps = row["steps"] or settings["steps"]
        cfg = row["cfg"] if row["cfg"] is not None else settings["guidance"]
        spec = {"folder": str(folder), "variant": row["variant"], "base": row["base"], "steps": steps, "cfg": cfg,
                "quick": args.quick, "seeds": payload["seeds"],
                "weights_mtime": max(p.stat().st_mtime for p in folder.rglob("*.safetensors"))}
        report = REPO / "runs" / "distill" / "eval" / row["key"]
        cached = report / "row.json"
        shipped = None
        if args.reuse_eval and cached.is_file() and json.loads(cached.read_text()) == spec:
            summary = json.loads((report / "summary.json").read_text())
            print(f"{row['key']}: reusing {report}", flush=True)
        elif args.reuse_eval and (shipped := same_base_eval(folder, row, steps, cfg, payload["seeds"])) is not None:
            summary, row = shipped, {**row, "reused_from": shipped["model"]}
            print(f"{row['key']}: reusing the evaluation of the same base weights in {shipped['model']}", flush=True)
        else:
            summary = run_evaluation(pipe=None, model_dir=folder, variant=row["variant"], base=row["base"] and pipe.distilled,
                                     steps=steps, guidance=cfg, quick=args.quick, seeds=args.seeds,
                                     out_dir=report, progress=False)
            cached.write_text(json.dumps(spec, indent=2) + "\n")
        # time on a quiet machine: other processes on these 2 cores inflate this figure many times over
        ms = (median_ms(lambda: pipe([TIMING_PROMPT], steps=steps, guidance=cfg, seed=0), repeats=args.repeats,
                        warmup=1)[0] if args.repeats > 0 else float("nan"))
        s = summary["sceneeval"]
        r = {**row, "steps": steps, "cfg": cfg, "sampler": settings["sampler"], "sceneeval": s, "alignment": summary["alignment"], "fd": summary["fd"],
             "images": summary["images"], "ms_per_image": None if ms != ms else round(ms, 1)}
        payload["rows"].append(r)
        print(row["key"], {k: r[k] for k in ("steps", "cfg", "alignment", "fd", "ms_per_image")}, s["overall"],
              flush=True)
        table.append([row["label"]] + [s[c] for c in CATEGORIES] + [f"**{s['overall']:.3f}**", summary["alignment"],
                                                                    summary["fd"], "-" if ms != ms else round(ms)])

    by_key = {r["key"]: r for r in payload["rows"]}
    verdicts = []
    for v in args.variants:
        b, d = by_key.get(f"base28_{v}"), by_key.get(f"dmd_{v}")
        for name in ["kdmd", *extra]:
            k = by_key.get(f"{name}_{v}")
            if not (k and b):
                continue
            gap = (k["sceneeval"]["overall"] - b["sceneeval"]["overall"]) / max(b["sceneeval"]["overall"], 1e-9)
            verdicts.append(f"{v}: {'K-DMD' if name == 'kdmd' else name} 4-step {k['sceneeval']['overall']:.3f} vs "
                            f"base 28-step {b['sceneeval']['overall']:.3f} ({100 * gap:+.1f}%; goal: within -5%)"
                            + (f", vs plain DMD {d['sceneeval']['overall']:.3f}" if d else "")
                            + (f"; {b['ms_per_image'] / k['ms_per_image']:.1f}x less time per image"
                               if b["ms_per_image"] and k["ms_per_image"] else ""))
    payload["verdicts"] = verdicts
    payload["missing"] = missing
    n = payload["rows"][0]["images"] if payload["rows"] else 0
    headers = ["model", "single", "two", "counting", "colours", "position", "colour attr", "SceneEval",
               "alignment", "FD", "ms / image"]
    text = "\n".join(["# K-DMD vs DMD vs base (SnapGen++ Table 4 on our data)", "",
                      f"{payload['machine']['cpu']}, {payload['machine']['threads']} threads, fp32. SceneEval on "
                      f"{n} images per row ({'quick' if args.quick else 'full'} prompt set), alignment and FD on "
                      "the same images; ms / image = one 64x64 image incl. text encoding and decoding, median.", "",
                      md_table(headers, table), ""] + [f"- {v}" for v in verdicts]
                     + ([""] + [f"- missing: {m}" for m in missing] if missing else []))
    print(text)
    write_results("distill" + ("_quick" if args.quick else ""), payload, text)


if __name__ == "__main__":
    main()
