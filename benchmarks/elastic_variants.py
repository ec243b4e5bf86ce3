"""Per-variant table of an elastic model (default: the shipped one): parameters, per-step latency at two
resolutions, peak memory, and (with ``--eval``) SceneEval, alignment and FD.

Each variant is first extracted to a standalone folder (what a device would ship); latency and memory are
measured on that standalone model in a fresh process: one sampling step = one denoiser call on one image
with CFG (batch 2), fp32, median of repeats; peak memory = the process's peak RSS after one full generation
(text encoder + denoiser + decoder), and the denoiser step alone above the loaded-model baseline.

    python benchmarks/elastic_variants.py [--model DIR] [--resolutions 64 128] [--eval quick|full] [--reuse-eval]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mib, machine, md_table, median_ms, peak_rss_mib, run_worker, setup_torch, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker(spec: dict) -> dict:
    torch = setup_torch()
    from snapgen.pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(spec["folder"])
    _ = pipe.text_encoder
    rss_loaded = current_rss_mib()
    model, f = pipe.transformer.eval(), pipe.vae_factor
    c = model.config
    out = {"params": model.num_parameters()}
    for res in spec["resolutions"]:
        x = torch.randn(2, c.in_channels, res // f, res // f)
        text = torch.randn(2, pipe.config.text_max_length, c.text_dim)
        t = torch.full((2,), 0.5)
        with torch.inference_mode():
            ms, _ = median_ms(lambda: model(x, t, {"text": text}), repeats=spec["repeats"], warmup=2)
        out[f"step_ms_{res}"] = round(ms, 2)
    pipe(["a red circle to the left of a blue square"], steps=4, height=spec["resolutions"][-1],
         width=spec["resolutions"][-1])
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    out["loaded_rss_mib"] = round(rss_loaded, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="elastic pipeline folder (default: the shipped model)")
    ap.add_argument("--resolutions", type=int, nargs=2, default=[64, 128])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eval", choices=["none", "quick", "full"], default="none")
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--reuse-eval", action="store_true",
                    help="take SceneEval/alignment/FD from runs/eval_variants/NAME/summary.json when it holds this "
                         "model, variant and step count (e.g. `snapgen eval --variant NAME --out` that folder)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    setup_torch()
    from snapgen.eval.run import run_evaluation
    from snapgen.pipelines import TextToImagePipeline, default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    pipe = TextToImagePipeline.from_pretrained(model_dir)
    rows, payload = [], {"machine": machine(), "model": str(model_dir), "resolutions": args.resolutions,
                         "latency": "one denoiser call, 1 image with CFG (batch 2), fp32, median", "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in pipe.variants:
            folder = Path(tmp) / name
            pipe.extract(name).save_pretrained(folder)
            r = run_worker(__file__, {"folder": str(folder), "resolutions": args.resolutions,
                                      "repeats": args.repeats})
            r["ratio"] = pipe.transformer.variants[name]
            if args.eval != "none":
                report = REPO / "runs" / "eval_variants" / name
                s = json.loads((report / "summary.json").read_text()) if (report / "summary.json").is_file() else {}
                if not (args.reuse_eval and s.get("steps") == args.eval_steps and s.get("variant", "full") == name
                        and Path(s.get("model", "")).resolve() == model_dir.resolve()):
                    s = run_evaluation(model_dir, steps=args.eval_steps, quick=args.eval == "quick", variant=name,
                                       out_dir=report, progress=False)
                else:
                    print(f"{name}: reusing the evaluation in {report}", flush=True)
                r.update(sceneeval=s["sceneeval"]["overall"], alignment=s["alignment"], fd=s["fd"],
                         eval_images=s["images"])
            payload["variants"][name] = r
            print(name, r, flush=True)
    lo, hi = args.resolutions
    headers = ["variant", "width", "params (M)", f"step ms @{lo}px", f"step ms @{hi}px", "peak RSS (MiB)"]
    if args.eval != "none":
        headers += ["SceneEval", "alignment", "FD"]
    for name, r in payload["variants"].items():
        row = [name, f"{r['ratio']:g}x", round(r["params"] / 1e6, 2), r[f"step_ms_{lo}"], r[f"step_ms_{hi}"],
               round(r["peak_rss_mib"])]
        if args.eval != "none":
            row += [r["sceneeval"], r["alignment"], r["fd"]]
        rows.append(row)
    text = "\n".join([f"# Elastic variants of {model_dir.name}", "",
                      f"{payload['machine']['cpu']}, {payload['machine']['threads']} threads. " + payload["latency"]
                      + (f"; eval: {args.eval}, {args.eval_steps} steps" if args.eval != "none" else ""), "",
                      md_table(headers, rows)])
    print(text)
    write_results("elastic_variants", payload, text)


if __name__ == "__main__":
    main()
