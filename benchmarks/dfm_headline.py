"""DFM's headline claim on our data (issue 22 §5; paper: FDD 185.7 -> 120.0, -35%, DiT-XL at ImageNet 512, equal
compute): the micro DiT trained from scratch at 128 px with plain flow matching (configs/dfm/headline_fm_128.yaml)
and as a 2-level DFM (configs/dfm/headline_dfm_128.yaml), same data, steps, batch and seed; SceneEval (unseen
headline prompts, intervals, paired) and FD at two budgets so convergence speed shows; seconds per training step of
both (paper: < 1.2% slower). ``--sweep`` adds DFM's sampling side: quality vs stage split and tau, and the time to
the first preview.

    python benchmarks/dfm_headline.py --train [--budgets 600 1200] [--seeds 1] [--sweep]

``--train`` runs ``snapgen train --steps B`` for each budget (a run extended from the previous budget: constant
learning rate + EMA, so stopping at B equals a run configured for B steps) and keeps each budget's export as
``final_B``. Writes ``benchmarks/results/dfm_headline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, md_table, setup_torch, write_results

REPO = Path(__file__).resolve().parents[1]
RUNS = {"FM": "configs/dfm/headline_fm_128.yaml", "DFM": "configs/dfm/headline_dfm_128.yaml"}
SWEEP = [((15, 5), 0.3), ((10, 10), 0.3), ((15, 5), 0.1), ((15, 5), 0.5), ((30, 10), 0.3), ((7, 3), 0.3)]


def seconds_per_step(run_dir: Path) -> float | None:
    """Median seconds per step between consecutive log records (``elapsed``; a resume's reset is skipped)."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "elapsed" in r and "step" in r]
    rates = [(b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"]) for a, b in zip(recs, recs[1:])
             if b["step"] > a["step"] and b["elapsed"] > a["elapsed"]]
    return round(statistics.median(rates), 3) if rates else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--budgets", type=int, nargs="+", default=[600, 1200])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="DFM sampling: stage split x tau, time to first preview")
    args = ap.parse_args()
    setup_torch()
    from snapgen.eval.run import LEVEL, N_BOOT, load_run, run_evaluation
    from snapgen.eval.stats import compare_rows
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.train import load_config

    vae = REPO / "runs" / "vae_micro" / "final"
    if not (vae / "config.json").is_file():
        vae.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(REPO / "models" / "snapgen-micro" / "vae", vae)
    payload = {"machine": machine(), "seeds": args.seeds, "budgets": args.budgets, "models": [], "paired": []}
    rows, diffs, reports = [], [], {}
    for budget in args.budgets:
        for label, cfg_path in RUNS.items():
            run_dir = REPO / load_config(REPO / cfg_path).run_dir
            kept = run_dir / f"final_{budget}"
            if not kept.is_dir():
                if not args.train:
                    print(f"{label}: {kept} is missing: pass --train", file=sys.stderr)
                    sys.exit(2)
                subprocess.run([sys.executable, "-m", "snapgen.cli", "train", "--config", cfg_path, "--steps",
                                str(budget), "--no-progress"], cwd=REPO, check=True)
                shutil.copytree(run_dir / "final", kept)
            out = REPO / "runs" / "dfm" / "eval" / f"headline_{label.lower()}_{budget}"
            s = run_evaluation(kept, seeds=args.seeds, out_dir=out, progress=False)
            reports[label, budget] = out
            ci = s["intervals"]["overall"]
            rec = {"objective": label, "steps": budget, "sceneeval": s["sceneeval"]["overall"], "ci": ci,
                   "fd": s.get("fd"), "alignment": s["alignment"], "sec_per_step": seconds_per_step(run_dir)}
            payload["models"].append(rec)
            rows.append([label, budget, f"{rec['sceneeval']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]",
                         "-" if rec["fd"] is None else f"{rec['fd']:.2f}", f"{rec['alignment']:.3f}",
                         rec["sec_per_step"]])
            print(rec, flush=True)
        o = compare_rows(load_run(reports["FM", budget])[1], load_run(reports["DFM", budget])[1], n_boot=N_BOOT,
                         level=LEVEL)["overall"]
        payload["paired"].append({"steps": budget, **o})
        diffs.append([budget, f"{o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]", f"{o['wins']} / {o['losses']}",
                      f"{o['p']:.2g}"])
    md = ["# DFM vs plain flow matching from scratch at 128 px (equal steps, batch, data, seed)", "",
          f"{machine()['cpu']}, {machine()['threads']} threads. SceneEval on the 480 unseen headline prompts x "
          f"{args.seeds} seed(s) with 95% prompt-clustered intervals; FD on the project's image encoder.", "",
          md_table(["objective", "steps", "SceneEval [95% CI]", "FD", "alignment", "s / step"], rows), "",
          "DFM - FM, paired on the same prompts and seeds:", "",
          md_table(["steps", "SceneEval difference", "won / lost", "p"], diffs)]
    if args.sweep:
        final = REPO / load_config(REPO / RUNS["DFM"]).run_dir / f"final_{args.budgets[-1]}"
        pipe = TextToImagePipeline.from_pretrained(final)
        sweep_rows = []
        for split, tau in SWEEP:
            pipe.config = pipe.config.replace(stage_steps=split, stage_thresholds=(tau,), steps=sum(split))
            firsts, totals = [], []
            pipe(["a red circle"], seed=0)  # warm-up
            for seed in range(5):
                t0 = time.perf_counter()
                pipe(["a red circle to the left of a blue square"], seed=seed,
                     preview=lambda k, ims, sec: firsts.append(sec) if k == 0 else None)
                totals.append(time.perf_counter() - t0)
            out = REPO / "runs" / "dfm" / "eval" / f"sweep_{'_'.join(map(str, split))}_{tau}"
            s = run_evaluation(final, seeds=args.seeds, out_dir=out, progress=False, pipe=pipe)
            ci = s["intervals"]["overall"]
            rec = {"stage_steps": list(split), "tau": tau, "sceneeval": s["sceneeval"]["overall"], "ci": ci,
                   "first_preview_s": round(statistics.median(firsts), 3),
                   "image_s": round(statistics.median(totals), 3)}
            payload.setdefault("sweep", []).append(rec)
            sweep_rows.append(["+".join(map(str, split)), tau, f"{rec['sceneeval']:.3f} [{ci['lo']:.3f}, "
                               f"{ci['hi']:.3f}]", rec["first_preview_s"], rec["image_s"]])
            print(rec, flush=True)
        md += ["", "DFM sampling (the 1,200-step model; one image, CFG 4): quality vs the stage split and tau, and "
               "when the first preview arrives (median of 5 images, from the start of sampling; whole image: the call):", "",
               md_table(["stage steps", "tau", "SceneEval [95% CI]", "first preview (s)", "whole image (s)"],
                        sweep_rows)]
    text = "\n".join(md)
    print(text)
    write_results("dfm_headline", payload, text)


if __name__ == "__main__":
    main()
