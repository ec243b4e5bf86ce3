"""Per-width vs shared modulation (issue 21 §1): one elastic supernetwork recipe trained twice, identical but for
``model.elastic_modulation``; reports each width's parameters and validation flow loss.

    snapgen train --config configs/elastic_table1/elastic.yaml              # shared (Table 1's elastic run)
    snapgen train --config configs/elastic_table1/elastic_per_width.yaml    # per-width modulation
    python benchmarks/elastic_modulation.py            # the table (add --train to train / resume both runs first)

Validation: the one fixed cache of ``data.val_cache``, same times and noise for every model (as
``benchmarks/elastic_table1.py``). Writes ``benchmarks/results/elastic_modulation.{json,md}``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _common import machine, md_table, setup_torch, write_results

REPO = Path(__file__).resolve().parents[1]
RUNS = {"shared": "elastic", "per_width": "elastic_per_width"}  # modulation -> configs/elastic_table1/<name>.yaml
WIDTHS = ("tiny", "small", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train (or resume) both runs first")
    args = ap.parse_args()
    configs = {mod: REPO / "configs" / "elastic_table1" / f"{name}.yaml" for mod, name in RUNS.items()}
    if args.train:
        for mod, cfg in configs.items():
            print(f"== training {mod}", flush=True)
            subprocess.run([sys.executable, "-m", "snapgen.cli", "train", "--config", str(cfg)], cwd=REPO,
                           check=True)
    from snapgen.train import load_config

    folders = {mod: REPO / load_config(cfg).run_dir / "final" for mod, cfg in configs.items()}
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        print(f"missing {', '.join(missing)}: train first (--train, or the snapgen train commands above)",
              file=sys.stderr)
        sys.exit(1)
    torch = setup_torch()

    from snapgen.data.latent_cache import load_latent_cache
    from snapgen.eval.stats import paired_mean_difference
    from snapgen.pipelines import TextToImagePipeline
    from snapgen.tasks import FlowTask, validation_loss

    cfg0 = load_config(configs["shared"])
    val = load_latent_cache(REPO / cfg0.data["val_cache"])
    objective = FlowTask(cfg0, torch.device("cpu")).objective  # the shared time distribution
    payload = {"machine": machine(), "steps": cfg0.steps, "batch_size": cfg0.batch_size,
               "val_samples": len(val["latents"]), "models": []}
    losses = {}
    for mod, folder in folders.items():
        pipe = TextToImagePipeline.from_pretrained(folder)
        if pipe.transformer.config.elastic_modulation != mod:
            raise SystemExit(f"{folder} has elastic_modulation={pipe.transformer.config.elastic_modulation!r}, "
                             f"expected {mod!r}")
        supernet = pipe.transformer.num_parameters()
        for v in WIDTHS:
            per = validation_loss(pipe.transformer, pipe.conditioning, val, variant=v, objective=objective,
                                  per_sample=True)
            losses[(mod, v)] = per.numpy()
            rec = {"modulation": mod, "width": v, "params": pipe.extract(v).transformer.num_parameters(),
                   "supernet_params": supernet, "val_loss": round(float(per.mean()), 5)}
            payload["models"].append(rec)
            print(rec, flush=True)
    by = {(r["modulation"], r["width"]): r for r in payload["models"]}
    rows = []
    for v in WIDTHS:
        s, p = by[("shared", v)], by[("per_width", v)]
        d = paired_mean_difference(losses[("shared", v)], losses[("per_width", v)])
        payload[f"per_width_minus_shared_{v}_percent"] = round(d["rel"], 2)
        payload[f"per_width_minus_shared_{v}"] = d
        rows.append([v, s["params"] / 1e6, s["val_loss"], p["val_loss"],
                     f"{d['rel']:+.2f}% [{d['rel_lo']:+.2f}, {d['rel_hi']:+.2f}]"])
    md = ["# Per-width vs shared modulation (elastic supernetwork)", "",
          f"{cfg0.steps} steps x batch {cfg0.batch_size} each, same data/optimiser/seed; supernet parameters: "
          f"shared {by[('shared', 'full')]['supernet_params'] / 1e6:.3f}M, per-width "
          f"{by[('per_width', 'full')]['supernet_params'] / 1e6:.3f}M. Validation loss on {payload['val_samples']} "
          f"held-out samples at fixed times and noise (lower is better); interval: paired bootstrap over the "
          f"validation samples (it covers the validation sample, not training-seed variation: one run each).", "",
          md_table(["width", "params (M)", "val loss shared", "val loss per-width", "per-width vs shared [95% CI]"],
                   rows)]
    text = "\n".join(md)
    print(text)
    write_results("elastic_modulation", payload, text)


if __name__ == "__main__":
    main()
