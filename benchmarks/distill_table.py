"""The K-DMD table (SnapGen++ Table 4 on our data; issue 6 §4, re-measured with issue 20's SceneEval): for each
elastic width, SceneEval with 95% intervals on the headline prompt set (480 unseen prompts x 4 seeds = 1,920
images per row), alignment, FD and wall time per image of

  (b) the base model (that width, adapters off) at 28 Euler steps with CFG 4 (the teacher) and at 4 steps, CFG 4;
  (c) plain DMD at 4 steps, no CFG (``configs/distill/dmd_students.yaml``; tiny and small);
  (d) K-DMD at 4 steps, no CFG, as shipped in ``models/snapgen-micro`` (full: the paper's feature MSE,
      ``configs/distill/kdmd.yaml``; tiny and small: the cosine feature term, ``configs/distill/kdmd_cosine.yaml``);

plus, when their run folders exist, K-DMD tiny/small with the paper's MSE (``runs/distill/kdmd/final``) and the
few-step teacher (``runs/distill/fewstep_teacher/final``); and the paired comparisons (``snapgen eval --compare``)
that decide the table's claims: K-DMD vs plain DMD, 4 steps vs the 28-step base.

Rows are ``snapgen eval`` runs in the same work folder as ``benchmarks/sceneeval_shipped.py`` (the teacher and
shipped rows are the same reports: ``teacher_V28``, ``V4``), images kept in GenEval's layout for re-scoring:

    snapgen distill dmd --config configs/distill/dmd_students.yaml    # the plain-DMD students (~40 min)
    python benchmarks/distill_table.py [--variants tiny small full] [--repeats 5] [--rescore] [--tables-only]

Wall time = median of ``--repeats`` single-image generations (text encoding, sampling, decoding; 2 threads, fp32)
after the evaluations, on a machine doing nothing else. Writes ``benchmarks/results/distill.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, median_ms, setup_torch, write_results  # noqa: E402
from sceneeval_shipped import CATS, cell, compare_row, run_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DMD = "runs/distill/dmd_students/final"
OPTIONAL = {DMD: "snapgen distill dmd --config configs/distill/dmd_students.yaml",
            "runs/distill/kdmd/final": "snapgen distill dmd --config configs/distill/fewstep_teacher.yaml && "
                                       "snapgen distill kdmd --config configs/distill/kdmd.yaml",
            "runs/distill/fewstep_teacher/final": "snapgen distill dmd --config configs/distill/fewstep_teacher.yaml"}
TIMING_PROMPT = "a red circle to the left of a blue square"


def rows_for(variants: list[str]) -> dict[str, dict]:
    """name -> {label, model (None: the shipped folder), variant, base, steps, cfg}; the snapgen eval arguments
    follow from these (:func:`eval_args`)."""
    rows = {}
    for v in variants:
        rows[f"teacher_{v}28"] = dict(label=f"(b) base {v}, 28 steps, CFG 4 (teacher)", model=None, variant=v,
                                      base=True, steps=28, cfg=4.0)
        rows[f"base4_{v}"] = dict(label=f"(b) base {v}, 4 steps, CFG 4", model=None, variant=v, base=True, steps=4,
                                  cfg=4.0)
        if v != "full":  # configs/distill/dmd_students.yaml distils tiny and small
            rows[f"dmd_{v}4"] = dict(label=f"(c) plain DMD {v}, 4 steps", model=DMD, variant=v, base=False,
                                     steps=None, cfg=None)
        feat = "feature MSE" if v == "full" else "cosine feature term"
        rows[f"{v}4"] = dict(label=f"(d) K-DMD {v}, 4 steps (shipped; {feat})", model=None, variant=v, base=False,
                             steps=None, cfg=None)
        if v != "full":
            rows[f"kdmd_mse_{v}4"] = dict(label=f"(d) K-DMD {v}, 4 steps, paper's feature MSE",
                                          model="runs/distill/kdmd/final", variant=v, base=False, steps=None,
                                          cfg=None)
    if "full" in variants:
        rows["fewstep4"] = dict(label="few-step teacher (full + its 4-step LoRA)",
                                model="runs/distill/fewstep_teacher/final", variant="full", base=False, steps=None,
                                cfg=None)
    return rows


def comparisons_for(variants: list[str]) -> list[tuple[str, str, str]]:
    """(a, b, question): b - a on the same cells."""
    out = []
    for v in variants:
        if v != "full":
            out += [(f"dmd_{v}4", f"{v}4", f"{v}: is K-DMD better than plain DMD?"),
                    (f"teacher_{v}28", f"dmd_{v}4", f"{v}: plain DMD 4 steps vs its 28-step base")]
        out += [(f"teacher_{v}28", f"{v}4", f"{v}: K-DMD 4 steps vs its 28-step base (goal: within 5%)"),
                (f"base4_{v}", f"{v}4", f"{v}: K-DMD vs the base at the same 4 steps")]
    return out


def eval_args(row: dict) -> list[str]:
    args = (["--model", str(REPO / row["model"])] if row["model"] else []) + ["--variant", row["variant"]]
    if row["base"]:
        args += ["--base"]
    if row["steps"]:
        args += ["--steps", str(row["steps"])]
    if row["cfg"] is not None:
        args += ["--cfg", str(row["cfg"])]
    return args


def available(row: dict) -> str | None:
    """None if the row can be generated, else why not (with the command that makes its model)."""
    if row["model"] is None:
        return None
    folder = REPO / row["model"]
    if not (folder / "pipeline.json").is_file():
        return f"{row['model']} not found: run `{OPTIONAL.get(row['model'], 'its training command')}`"
    if row["variant"] not in (json.loads((folder / "pipeline.json").read_text()).get("adapters") or {}):
        return f"{row['model']} has no {row['variant']} adapter"
    return None


def time_rows(rows: dict[str, dict], repeats: int) -> dict[str, float]:
    from snapgen.pipelines import TextToImagePipeline, default_model_dir

    out = {}
    for name, row in rows.items():
        pipe = TextToImagePipeline.from_pretrained(REPO / row["model"] if row["model"] else default_model_dir(),
                                                   variant=row["variant"])
        if row["base"]:
            pipe.use_base()
        ms, _ = median_ms(lambda: pipe([TIMING_PROMPT], steps=row["steps"], guidance=row["cfg"], seed=0),
                          repeats=repeats, warmup=1)
        out[name] = round(ms, 1)
        print(f"{name}: {ms:.0f} ms / image", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["tiny", "small", "full"], choices=["tiny", "small", "full"])
    ap.add_argument("--work", default="runs/eval20", help="report + image folders (shared with sceneeval_shipped.py)")
    ap.add_argument("--rescore", action="store_true", help="re-score kept images with the current detector")
    ap.add_argument("--tables-only", action="store_true", help="no generation: tables from existing reports")
    ap.add_argument("--repeats", type=int, default=5, help="timed single-image generations per row (0: no timing)")
    args = ap.parse_args(argv)
    setup_torch()
    work = REPO / args.work
    rows = rows_for(args.variants)
    missing = {n: why for n, r in rows.items() if (why := available(r))}
    present = {n: r for n, r in rows.items() if n not in missing}
    if not args.tables_only:
        run_rows(work, {n: (r["label"], "headline", eval_args(r)) for n, r in present.items()}, args.rescore)
    ms = time_rows(present, args.repeats) if args.repeats > 0 else {}
    summaries = {n: json.loads((work / n / "summary.json").read_text()) for n in present
                 if (work / n / "summary.json").is_file()}
    body = []
    for n, s in summaries.items():
        body.append([rows[n]["label"], *[cell(s, c) for c in CATS], f"**{cell(s, 'overall')}**",
                     "-" if s.get("alignment") is None else f"{s['alignment']:.3f}",
                     "-" if s.get("fd") is None else f"{s['fd']:.2f}", ms.get(n, "-")])
    comps, crow = {}, []
    for a, b, question in comparisons_for(args.variants):
        if a in summaries and b in summaries:
            c, line = compare_row(work, a, b, question, rows[a]["label"], rows[b]["label"])
            comps[f"{b}-{a}"], _ = c, crow.append(line)
    m = machine()
    n_images = next(iter(summaries.values()))["images"] if summaries else 0
    md = ["# K-DMD vs plain DMD vs base (SnapGen++ Table 4 on our data)", "",
          f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date']}. `python benchmarks/distill_table.py`; "
          f"SceneEval on the headline set ({n_images} images per row), 95% intervals: bootstrap over prompts within "
          f"category; ms / image: one 64x64 image incl. text encoding and decoding, median of {args.repeats}.", "",
          md_table(["model", *CATS, "**overall**", "alignment", "FD", "ms / image"], body), ""]
    if crow:
        md += ["Paired comparisons (B - A on the same prompts and seeds; interval: paired bootstrap over prompts; "
               "wins / losses: images B got right and A wrong / the reverse; p: McNemar exact):", "",
               md_table(["question", "A", "B", "B - A overall", "wins / losses", "p", "verdict"], crow), ""]
    md += [f"- not measured: {rows[n]['label']}: {why}" for n, why in missing.items()]
    text = "\n".join(md)
    print(text)
    write_results("distill", {"machine": m, "rows": {n: {**rows[n], "summary": s, "ms_per_image": ms.get(n)}
                                                      for n, s in summaries.items()},
                              "comparisons": comps, "missing": missing}, text)


if __name__ == "__main__":
    main()
