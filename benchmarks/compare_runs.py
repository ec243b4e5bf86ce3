"""Two training runs, one paired comparison: validation flow loss per sample (B - A with a bootstrap interval over
the validation samples) and optionally SceneEval (headline set, paired ``--compare``).

Each run is read from its config: its ``final/`` pipeline and its own ``data.val_cache``. The two caches must hold
the same validation items (same ``val_spec``: the latents are compared and must be equal), so the only difference
is the models and what their caches store about the captions -- e.g. one text encoder against two:

    python benchmarks/compare_runs.py configs/elastic_table1/standalone_full.yaml \\
        configs/elastic_table1/standalone_full_two_encoders.yaml --name text_encoders [--sceneeval full --seeds 1]

Writes ``benchmarks/results/compare_NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import machine, md_table, setup_torch, write_results

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="config of run A (the reference)")
    ap.add_argument("b", help="config of run B")
    ap.add_argument("--name", required=True, help="results name: benchmarks/results/compare_NAME.*")
    ap.add_argument("--sceneeval", choices=["none", "quick", "full"], default="none")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch = setup_torch()
    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.eval.stats import paired_mean_difference
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.tasks import FlowTask, validation_loss
    from snapgen.train import load_config

    runs = {"A": load_config(args.a), "B": load_config(args.b)}
    for k, c in runs.items():
        if not (REPO / c.run_dir / "final").is_dir():
            print(f"run {k} has no {c.run_dir}/final: train it first (snapgen train --config "
                  f"{args.a if k == 'A' else args.b})", file=sys.stderr)
            sys.exit(2)
    caches = {k: load_latent_cache(REPO / c.data["val_cache"]) for k, c in runs.items()}
    if not torch.equal(caches["A"]["latents"], caches["B"]["latents"]):
        print("the two validation caches hold different items (their val_spec differ): not comparable",
              file=sys.stderr)
        sys.exit(2)
    objective = FlowTask(runs["A"], torch.device("cpu")).objective
    per, rows, payload = {}, [], {"machine": machine(), "a": args.a, "b": args.b, "models": []}
    evals = {}
    for k, c in runs.items():
        folder = REPO / c.run_dir / "final"
        pipe = TextToImagePipeline.from_pretrained(folder)
        per[k] = validation_loss(pipe.transformer, pipe.conditioning, caches[k], objective=objective,
                                 per_sample=True).numpy()
        rec = {"run": k, "config": args.a if k == "A" else args.b, "text_encoder": pipe.config.text_encoder,
               "params": pipe.transformer.num_parameters() + sum(p.numel() for p in pipe.conditioning.parameters()),
               "val_loss": round(float(per[k].mean()), 5)}
        if args.sceneeval != "none":
            from snapgen.eval.run import run_evaluation

            out = REPO / "runs" / "compare" / args.name / k
            s = run_evaluation(folder, steps=28, guidance=4.0, seeds=args.seeds, quick=args.sceneeval == "quick",
                               out_dir=out, progress=False)
            evals[k] = out
            ci = s["intervals"]["overall"]
            rec.update(sceneeval=s["sceneeval"]["overall"], sceneeval_ci=ci, alignment=s["alignment"])
        payload["models"].append(rec)
        row = [k, rec["config"], str(rec["text_encoder"]), rec["params"] / 1e6, rec["val_loss"]]
        if "sceneeval" in rec:
            row += [f"{rec['sceneeval']:.3f} [{ci['lo']:.2f}, {ci['hi']:.2f}]", rec["alignment"]]
        rows.append(row)
        print(rec, flush=True)
    d = paired_mean_difference(per["A"], per["B"])
    payload["val_loss_b_minus_a"] = d
    headers = ["run", "config", "text encoder(s)", "params (M)", "val loss"] + (
        ["SceneEval [95% CI]", "alignment"] if evals else [])
    md = [f"# {args.name}: B vs A", "", f"{machine()['cpu']}, {machine()['threads']} threads; validation loss on "
          f"{len(per['A'])} held-out samples at fixed times and noise.", "", md_table(headers, rows), "",
          f"B - A validation loss: {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] ({d['rel']:+.2f}% "
          f"[{d['rel_lo']:+.2f}, {d['rel_hi']:+.2f}]; paired bootstrap over the validation samples, one training run "
          f"each)."]
    if evals:
        from snapgen.eval.run import LEVEL, N_BOOT, load_run
        from snapgen.eval.stats import compare_rows

        o = compare_rows(load_run(evals["A"])[1], load_run(evals["B"])[1], n_boot=N_BOOT, level=LEVEL)["overall"]
        payload["sceneeval_b_minus_a"] = o
        md += ["", f"SceneEval B - A, paired: {o['diff']:+.3f} [{o['lo']:+.3f}, {o['hi']:+.3f}], {o['wins']} won / "
                   f"{o['losses']} lost, McNemar p {o['p']:.2g}."]
    text = "\n".join(md)
    print(text)
    write_results(f"compare_{args.name}", payload, text)


if __name__ == "__main__":
    main()
