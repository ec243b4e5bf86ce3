"""DFM fine-tuning on our data (issue 22 §5; the paper's FLUX-DFM vs FLUX-FT, FID 12.56 -> 8.83 at 32k steps):
the shipped model's base (full width, adapters off) continued for the same steps with plain flow matching
(configs/dfm/finetune_fm.yaml) and converted to DFM (configs/dfm/finetune_dfm.yaml, snapgen.models.multiscale.to_dfm),
same data, batch, seed; SceneEval on the unseen headline prompts, every pair of models compared on the same
prompts and seeds (``snapgen eval --compare``'s paired statistics), the untouched base as a reference row.

    python benchmarks/dfm_finetune.py --train [--seeds 1]

Prepares runs/vae_micro/final (the shipped autoencoder) and runs/dfm/shipped_full (the base, extracted) if missing;
``--train`` trains each fine-tune whose ``final/`` is missing (``snapgen train``, resumable). Writes
``benchmarks/results/dfm_finetune.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, md_table, setup_torch, write_results

REPO = Path(__file__).resolve().parents[1]
RUNS = {"FM fine-tune": "configs/dfm/finetune_fm.yaml", "DFM fine-tune": "configs/dfm/finetune_dfm.yaml"}
OUT_NAMES = {"base (no fine-tune)": "base", "FM fine-tune": "fm", "DFM fine-tune": "dfm",
             "DFM fine-tune, tau 0.1": "dfm_tau01", "base converted to DFM (no fine-tune)": "base_to_dfm"}


def prepare(torch) -> Path:
    from snapgen.pipelines import TextToImagePipeline

    vae = REPO / "runs" / "vae_micro" / "final"
    if not (vae / "config.json").is_file():
        vae.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(REPO / "models" / "snapgen-micro" / "vae", vae)
    base = REPO / "runs" / "dfm" / "shipped_full"
    if not (base / "pipeline.json").is_file():
        pipe = TextToImagePipeline.from_pretrained(REPO / "models" / "snapgen-micro", variant="full")
        pipe.use_base()
        pipe.extract("full").save_pretrained(base, dtype=torch.float32)
        print(f"extracted the shipped base (full, adapters off) to {base}", flush=True)
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train the fine-tunes whose final/ is missing")
    ap.add_argument("--seeds", type=int, default=1, help="SceneEval seeds per headline prompt (480 prompts)")
    ap.add_argument("--diagnose", action="store_true",
                    help="two more rows: the DFM fine-tune sampled with the official code's tau 0.1, and the base "
                         "converted to DFM without fine-tuning (where a DFM gap comes from)")
    ap.add_argument("--reuse", action="store_true", help="read the report folders already under runs/dfm/eval "
                                                         "(same seeds) instead of evaluating again")
    args = ap.parse_args()
    torch = setup_torch()
    from snapgen.eval.run import LEVEL, N_BOOT, load_run, run_evaluation
    from snapgen.eval.stats import compare_rows
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.train import load_config

    base = prepare(torch)
    folders = {"base (no fine-tune)": base}
    train_s = {}
    for label, cfg_path in RUNS.items():
        cfg = load_config(REPO / cfg_path)
        final = REPO / cfg.run_dir / "final"
        if not final.is_dir():
            if not args.train:
                print(f"{label}: {cfg.run_dir}/final is missing: pass --train (or snapgen train --config "
                      f"{cfg_path})", file=sys.stderr)
                sys.exit(2)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "snapgen.cli", "train", "--config", cfg_path, "--no-progress"],
                           cwd=REPO, check=True)
            train_s[label] = round(time.perf_counter() - t0, 1)
        folders[label] = final
    payload = {"machine": machine(), "seeds": args.seeds, "train_seconds": train_s, "models": []}
    rows, reports = [], {}
    variants = {label: (folder, None) for label, folder in folders.items()}
    if args.diagnose:
        from snapgen.models.multiscale import to_dfm

        tuned = TextToImagePipeline.from_pretrained(folders["DFM fine-tune"])
        tuned.config = tuned.config.replace(stage_thresholds=(0.1,))
        converted = TextToImagePipeline.from_pretrained(base)
        dfm_cfg = TextToImagePipeline.from_pretrained(folders["DFM fine-tune"]).config
        converted = type(converted)(to_dfm(converted.transformer, 2), converted.conditioning, converted.vae,
                                    converted.config.replace(sampler="dfm", stage_steps=dfm_cfg.stage_steps,
                                                             stage_thresholds=dfm_cfg.stage_thresholds),
                                    text_encoder=converted.text_encoder)
        variants["DFM fine-tune, tau 0.1"] = (folders["DFM fine-tune"], tuned)
        variants["base converted to DFM (no fine-tune)"] = (base, converted)
    for label, (folder, given) in variants.items():
        pipe = given or TextToImagePipeline.from_pretrained(folder)
        out = REPO / "runs" / "dfm" / "eval" / OUT_NAMES[label]
        t0 = time.perf_counter()
        summary = load_run(out)[0] if args.reuse and (out / "summary.json").is_file() else None
        s = summary if summary and summary.get("seeds") == args.seeds else \
            run_evaluation(folder, seeds=args.seeds, out_dir=out, progress=False, pipe=given)
        reports[label] = out
        ci = s["intervals"]["overall"]
        sampler = pipe.sampler_config()
        rec = {"model": label, "folder": str(folder.relative_to(REPO)), "sampler": sampler.to_dict(),
               "sceneeval": s["sceneeval"]["overall"], "ci": ci, "alignment": s["alignment"],
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        payload["models"].append(rec)
        steps = "+".join(map(str, sampler.stage_steps)) if sampler.kind == "dfm" else str(sampler.steps)
        rows.append([label, f"{sampler.kind} {steps}, CFG {sampler.guidance:g}",
                     f"{rec['sceneeval']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]", f"{rec['alignment']:.3f}"])
        print(rec, flush=True)
    pairs = [("FM fine-tune", "base (no fine-tune)"), ("DFM fine-tune", "base (no fine-tune)"),
             ("DFM fine-tune", "FM fine-tune")]
    if args.diagnose:
        pairs += [("DFM fine-tune, tau 0.1", "DFM fine-tune"), ("base converted to DFM (no fine-tune)",
                                                                 "base (no fine-tune)"),
                  ("DFM fine-tune", "base converted to DFM (no fine-tune)")]
    diffs = []
    for b, a in pairs:
        o = compare_rows(load_run(reports[a])[1], load_run(reports[b])[1], n_boot=N_BOOT, level=LEVEL)["overall"]
        payload.setdefault("paired", []).append({"b": b, "a": a, **o})
        diffs.append([f"{b} - {a}", f"{o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}]", f"{o['wins']} / {o['losses']}",
                      f"{o['p']:.2g}"])
    cfg = load_config(REPO / RUNS["FM fine-tune"])
    md = ["# DFM fine-tuning vs plain flow-matching fine-tuning (equal steps)", "",
          f"{machine()['cpu']}, {machine()['threads']} threads. Both from the shipped base (full width, adapters "
          f"off), {cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.optim.lr:g}, same data / seed "
          f"({', '.join(RUNS.values())}); SceneEval on the 480 unseen headline prompts x {args.seeds} seed(s), "
          f"95% prompt-clustered bootstrap intervals.", "",
          md_table(["model", "sampler", "SceneEval [95% CI]", "alignment"], rows), "",
          "Paired on the same prompts and seeds (B - A, bootstrap interval, images won / lost, McNemar p):", "",
          md_table(["B - A", "SceneEval difference", "won / lost", "p"], diffs)]
    if train_s:
        md += ["", "Training wall time (s): " + ", ".join(f"{k} {v}" for k, v in train_s.items())]
    text = "\n".join(md)
    print(text)
    write_results("dfm_finetune", payload, text)


if __name__ == "__main__":
    main()
