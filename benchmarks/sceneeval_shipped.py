"""The shipped model's quality table (README, docs/evaluation.md; issue 20 §5): SceneEval with 95% intervals on the
headline prompt set (480 prompts no training caption contains, x 4 seeds = 1,920 images per row) for every variant
at its shipped 4 steps and for the teacher (the base model, 28 Euler steps, CFG 4), plus secondary rows on the
in-distribution, paraphrase and held-out-pair sets; and paired comparisons (``snapgen eval --compare``) for the
claims README makes.

    python benchmarks/sceneeval_shipped.py                # runs the rows that have no report yet, then the tables
    python benchmarks/sceneeval_shipped.py --rescore      # re-score the kept images with the current detector
    python benchmarks/sceneeval_shipped.py --rows full4 small4 --work runs/eval20

The quantized rows quantize the shipped model first (``snapgen quantize --variant V --out runs/eval20/q_V``, its
default 16 calibration prompts from the in-distribution set, none from the headline set).

Every row keeps its images in GenEval's layout (``--save-images``), so a new detector re-scores the same images
(``--rescore``, about a minute per row) instead of regenerating them. Generation takes ~4 minutes per 4-step row
and ~15 for a 28-step teacher row on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name: (label, prompt set, snapgen eval arguments)
ROWS = {
    "full4": ("full, 4 steps (shipped)", "headline", ["--variant", "full"]),
    "small4": ("small, 4 steps (shipped)", "headline", ["--variant", "small"]),
    "tiny4": ("tiny, 4 steps (shipped)", "headline", ["--variant", "tiny"]),
    "teacher_full28": ("teacher full, 28 steps, CFG 4", "headline", ["--variant", "full", "--base", "--steps", "28",
                                                                     "--cfg", "4"]),
    "teacher_small28": ("teacher small, 28 steps, CFG 4", "headline", ["--variant", "small", "--base", "--steps",
                                                                       "28", "--cfg", "4"]),
    "teacher_tiny28": ("teacher tiny, 28 steps, CFG 4", "headline", ["--variant", "tiny", "--base", "--steps", "28",
                                                                     "--cfg", "4"]),
    "full4_indist": ("full, 4 steps", "sceneeval (in-distribution: training captions)", ["--variant", "full",
                                                                                         "--prompts", "sceneeval"]),
    "full4_paraphrase": ("full, 4 steps", "sceneeval_paraphrase", ["--variant", "full", "--prompts",
                                                                   "sceneeval_paraphrase"]),
    "full4_heldout": ("full, 4 steps", "sceneeval_heldout (held-out pairs)", ["--variant", "full", "--prompts",
                                                                               "sceneeval_heldout"]),
    **{f"quant_{v}": (f"{v}, 4 steps, k-means 4.3 bit (`snapgen quantize --variant {v}`)", "headline",
                      ["--model", str(REPO / "runs" / "eval20" / f"q_{v}")]) for v in ("full", "small", "tiny")},
}
# (a, b, what the comparison decides): b - a
COMPARISONS = [
    ("full4", "teacher_full28", "does distillation to 4 steps cost the full width quality?"),
    ("small4", "teacher_small28", "... the small width?"),
    ("tiny4", "teacher_tiny28", "... the tiny width?"),
    ("small4", "full4", "is full better than small at 4 steps?"),
    ("tiny4", "small4", "is small better than tiny at 4 steps?"),
    ("full4", "quant_full", "does k-means quantization cost full quality?"),
    ("small4", "quant_small", "... small?"),
    ("tiny4", "quant_tiny", "... tiny?"),
]
CATS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def _cli(argv: list[str]) -> None:
    from snapgen.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"snapgen {' '.join(argv)} exited {rc}")


def run_rows(work: Path, rows: dict[str, tuple], rescore: bool) -> None:
    """Generate + score (or, with ``rescore``, re-score the kept images of) every row ``name -> (label, prompt
    set, snapgen eval arguments)`` that has no report in ``work`` yet."""
    for name, (_, _, argv) in rows.items():
        report, images = work / name, work / "img" / name
        if rescore and images.is_dir():
            print(f"re-scoring {name} ({images})", flush=True)
            _cli(["eval", "--images", str(images), "--out", str(report), "--no-progress", "--json"])
            continue
        if (report / "summary.json").is_file():
            continue
        model = argv[1] if argv[:1] == ["--model"] else None
        if model and not Path(model, "pipeline.json").is_file() and name.startswith("quant_"):  # quantize first
            _cli(["quantize", "--variant", name.removeprefix("quant_"), "--out", model])
        print(f"generating + scoring {name}", flush=True)
        _cli(["eval", "--out", str(report), "--save-images", str(images), "--no-progress", "--json", *argv])


def cell(s: dict, key: str) -> str:
    ci = s["intervals"][key]
    return f"{ci['value']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]"


def compare_row(work: Path, a: str, b: str, question: str, label_a: str, label_b: str) -> tuple[dict, list]:
    """``snapgen eval --compare`` of reports ``a`` and ``b`` (b - a) and its table line."""
    from snapgen.eval.run import compare_runs

    c = compare_runs(work / a, work / b, out_dir=work / f"compare_{a}_vs_{b}", progress=False)
    o = c["scores"]["overall"]
    verdict = "B better" if o["lo"] > 0 else "A better" if o["hi"] < 0 else "not resolved"
    return c, [question, label_a, label_b, f"{o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]",
               f"{o['wins']} / {o['losses']}", f"{o['p']:.2g}", verdict]


def tables(work: Path, rows: list[str]) -> tuple[str, dict]:
    summaries = {n: json.loads((work / n / "summary.json").read_text()) for n in rows
                 if (work / n / "summary.json").is_file()}
    body = []
    for n, s in summaries.items():
        label, pset, _ = ROWS[n]
        a = s.get("alignment_interval")
        align = "-" if s.get("alignment") is None else (
            f"{s['alignment']:.3f}" + (f" [{a['lo']:.3f}, {a['hi']:.3f}]" if a else ""))
        body.append([label, pset, s["images"], *[cell(s, c) for c in CATS], f"**{cell(s, 'overall')}**", align,
                     "-" if s.get("fd") is None else f"{s['fd']:.2f}"])
    md = [md_table(["model", "prompts", "images", *CATS, "**overall**", "alignment", "FD"], body), ""]
    comps = {}
    crow = []
    for a, b, question in COMPARISONS:
        if a in summaries and b in summaries:
            comps[f"{b}-{a}"], line = compare_row(work, a, b, question, ROWS[a][0], ROWS[b][0])
            crow.append(line)
    if crow:
        md += ["Paired comparisons (B - A on the same prompts and seeds; interval: paired bootstrap over prompts; "
               "wins / losses: images B got right and A wrong / the reverse; p: McNemar exact, pooled over prompts):",
               "", md_table(["question", "A", "B", "B - A overall", "wins / losses", "p", "verdict"], crow)]
    return "\n".join(md) + "\n", {"rows": summaries, "comparisons": comps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/eval20", help="report + image folders (default runs/eval20)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--rescore", action="store_true", help="re-score kept images with the current detector")
    ap.add_argument("--tables-only", action="store_true", help="no generation: tables from existing reports")
    args = ap.parse_args(argv)
    work = REPO / args.work  # relative to the repository, wherever the script is run from
    if not args.tables_only:
        run_rows(work, {n: ROWS[n] for n in args.rows}, args.rescore)
    md, payload = tables(work, args.rows)
    m = machine()
    head = (f"# The shipped model on SceneEval (issue 20 §5)\n\n{m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
            f"{m['date']}. `python benchmarks/sceneeval_shipped.py`; 95% intervals: bootstrap over prompts within "
            f"category (each prompt with all its seeds).\n\n")
    print(head + md)
    write_results("sceneeval", {"machine": m, **payload}, head + md)


if __name__ == "__main__":
    main()
