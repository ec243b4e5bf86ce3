"""What DFM costs the backbone (issue 22 §2 / §5; paper: DiT-XL 712.1M -> 716.5M parameters, the same GFLOPs,
< 1.2% slower per training iteration): parameters and the wall time of one training step (forward + backward of
the objective, AdamW update) of the micro three-stage DiT with plain flow matching and with a 2-level DFM pyramid,
at 64 and 128 px (micro VAE factor 4: 16x16 and 32x32 latents), measured interleaved in one process (medians).

    python benchmarks/dfm_overhead.py [--batch 16] [--repeats 7]

Writes ``benchmarks/results/dfm_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, md_table, setup_torch, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch = setup_torch()
    from snapgen.flow import FlowMatchingLoss
    from snapgen.flow.dfm import DecomposableFlowLoss
    from snapgen.models import ThreeStageDiT, preset

    rows, payload = [], {"machine": machine(), "batch": args.batch, "results": []}
    for res in (64, 128):
        side = res // 4
        setups = {}
        for name, levels in (("flow matching", 1), ("DFM, 2 levels", 2)):
            torch.manual_seed(0)
            model = ThreeStageDiT(preset("micro", dfm_levels=levels))
            objective = FlowMatchingLoss() if levels == 1 else DecomposableFlowLoss(levels=2, stage_probs=[0.5, 0.5])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(args.batch, 4, side, side, generator=g)
            cond = {"text": torch.randn(args.batch, 16, model.config.text_dim, generator=g),
                    "text_mask": torch.ones(args.batch, 16, dtype=torch.bool)}
            setups[name] = (model, objective, opt, x0, cond)

        def step(name, gen):
            model, objective, opt, x0, cond = setups[name]
            loss, _, _ = objective(model, x0, generator=gen, cond=cond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = {name: [] for name in setups}
        gens = {name: torch.Generator().manual_seed(1) for name in setups}
        for name in setups:  # warm-up
            step(name, gens[name])
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
            for name in setups:
                t0 = time.perf_counter()
                step(name, gens[name])
                times[name].append((time.perf_counter() - t0) * 1000)
        ref = None
        for name, (model, *_rest) in setups.items():
            ms = statistics.median(times[name])
            params = model.num_parameters()
            ref = ref or (ms, params)
            rec = {"resolution": res, "objective": name, "params": params, "step_ms": round(ms, 1),
                   "all_ms": [round(t, 1) for t in times[name]]}
            payload["results"].append(rec)
            rows.append([f"{res} px ({side}x{side} latent)", name, f"{params / 1e6:.3f}",
                         f"{100 * (params / ref[1] - 1):+.2f}%", f"{ms:.0f}", f"{100 * (ms / ref[0] - 1):+.1f}%"])
            print(rec, flush=True)
    md = ["# DFM overhead: parameters and training-step time", "",
          f"{machine()['cpu']}, {machine()['threads']} threads; micro preset, batch {args.batch}, one training step "
          f"(objective forward + backward + AdamW), median of {args.repeats} interleaved repeats. Paper (DiT-XL/2): "
          f"712.1M -> 716.5M parameters (+0.62%), < 1.2% slower per iteration.", "",
          md_table(["resolution", "objective", "params (M)", "vs FM", "step (ms)", "vs FM"], rows)]
    text = "\n".join(md)
    print(text)
    write_results("dfm_overhead", payload, text)


if __name__ == "__main__":
    main()
