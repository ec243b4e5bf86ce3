"""SnapGen++ Fig. 3's quality side (issue 21 §4): three-stage DiT dense vs three-stage + ASSA at equal steps, on a
16x16 token grid (128 px with the micro autoencoder), where ASSA's local branch sees 6 of 16 token rows.

The two configs of ``configs/fig3/`` differ only in ``model.outer_attention``. Reports parameters, validation flow
loss on one fixed 128 px validation cache (same times and noise for both; the ASSA - dense difference with a
paired bootstrap interval over the validation samples) and optionally SceneEval (headline set, 28 steps, CFG 4,
paired comparison). Paper (Fig. 3, their scale): 0.5130 vs 0.5130. Writes ``benchmarks/results/fig3_quality.*``.

    python benchmarks/fig3_quality.py --train                        # both runs (resume), then the table
    python benchmarks/fig3_quality.py --sceneeval full --seeds 1     # + SceneEval (480 images per model)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import machine, md_table, setup_torch, write_results

REPO = Path(__file__).resolve().parents[1]
RUNS = {"dense": "three_stage_dense", "ASSA": "three_stage_assa"}   # label -> configs/fig3/<name>.yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train (or resume) both runs first")
    ap.add_argument("--sceneeval", choices=["none", "quick", "full"], default="none")
    ap.add_argument("--seeds", type=int, default=4, help="SceneEval images per prompt")
    args = ap.parse_args()
    configs = {label: REPO / "configs" / "fig3" / f"{name}.yaml" for label, name in RUNS.items()}
    if args.train:
        for label, cfg in configs.items():
            print(f"== training {label}", flush=True)
            subprocess.run([sys.executable, "-m", "snapgen.cli", "train", "--config", str(cfg), "--no-progress"],
                           cwd=REPO, check=True)
    torch = setup_torch()
    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.eval.stats import paired_mean_difference
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.tasks import FlowTask, validation_loss
    from snapgen.train import load_config

    cfgs = {label: load_config(c) for label, c in configs.items()}
    folders = {label: REPO / c.run_dir / "final" for label, c in cfgs.items()}
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        print(f"missing {', '.join(missing)}: train first (--train)", file=sys.stderr)
        sys.exit(1)
    cfg0 = cfgs["dense"]
    val = load_latent_cache(REPO / cfg0.data["val_cache"])
    objective = FlowTask(cfg0, torch.device("cpu")).objective
    payload = {"machine": machine(), "steps": cfg0.steps, "batch_size": cfg0.batch_size,
               "resolution": cfg0.data["resolution"], "val_samples": len(val["latents"]), "models": []}
    per, evals = {}, {}
    for label, folder in folders.items():
        pipe = TextToImagePipeline.from_pretrained(folder)
        attn = pipe.transformer.config.outer_attention
        if attn != label.lower():
            raise SystemExit(f"{folder} has outer_attention={attn!r}, expected {label.lower()!r}")
        h = w = cfg0.data["resolution"] // pipe.transformer.config.vae_factor // pipe.transformer.config.patch_size
        per[label] = validation_loss(pipe.transformer, pipe.conditioning, val, objective=objective,
                                     per_sample=True).numpy()
        rec = {"model": label, "params": pipe.transformer.num_parameters(), "tokens": f"{h}x{w}",
               "val_loss": round(float(per[label].mean()), 5), "train_seconds": _train_seconds(folder.parent)}
        if args.sceneeval != "none":
            from snapgen.eval.run import run_evaluation

            out = REPO / "runs" / "fig3" / f"eval_{RUNS[label]}"
            s = run_evaluation(folder, steps=28, guidance=4.0, seeds=args.seeds, quick=args.sceneeval == "quick",
                               out_dir=out, progress=False)
            evals[label] = out
            rec.update(sceneeval=s["sceneeval"]["overall"], sceneeval_ci=s["intervals"]["overall"],
                       alignment=s["alignment"], fd=s["fd"], images=s["images"])
        payload["models"].append(rec)
        print(rec, flush=True)
    d = paired_mean_difference(per["dense"], per["ASSA"])
    payload["assa_minus_dense_val_loss"] = d
    headers = ["model", "params (M)", "tokens (Down/Up)", "val loss", "train s"]
    rows = []
    for r in payload["models"]:
        row = [f"three-stage {r['model']}", r["params"] / 1e6, r["tokens"], r["val_loss"], r["train_seconds"]]
        if "sceneeval" in r:
            ci = r["sceneeval_ci"]
            row += [f"{r['sceneeval']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]", r["alignment"], r["fd"]]
        rows.append(row)
    if evals:
        headers += ["SceneEval [95% CI]", "alignment", "FD"]
    md = ["# Fig. 3 quality: three-stage dense vs three-stage + ASSA (equal steps)", "",
          f"{payload['steps']} steps x batch {payload['batch_size']} each at {payload['resolution']} px, same "
          f"data/optimiser/seed; validation loss on {payload['val_samples']} held-out samples at fixed times and "
          f"noise. {machine()['cpu']}, {machine()['threads']} threads.", "", md_table(headers, rows), "",
          f"ASSA - dense validation loss: {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] "
          f"({d['rel']:+.2f}% [{d['rel_lo']:+.2f}, {d['rel_hi']:+.2f}]; paired bootstrap over the validation "
          f"samples, one training run each). Paper: 0.5130 vs 0.5130."]
    if evals:
        from snapgen.eval.run import LEVEL, N_BOOT, load_run
        from snapgen.eval.stats import compare_rows

        o = compare_rows(load_run(evals["dense"])[1], load_run(evals["ASSA"])[1], n_boot=N_BOOT,
                         level=LEVEL)["overall"]
        payload["sceneeval_assa_minus_dense"] = o
        md += ["", f"SceneEval ASSA - dense, paired: {o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}], "
                   f"{o['wins']} won / {o['losses']} lost, McNemar p {o['p']:.2g}."]
    text = "\n".join(md)
    print(text)
    write_results("fig3_quality", payload, text)


def _train_seconds(run_dir: Path) -> float | None:
    f = run_dir / "summary.json"
    return json.loads(f.read_text()).get("train_seconds") if f.is_file() else None


if __name__ == "__main__":
    main()
