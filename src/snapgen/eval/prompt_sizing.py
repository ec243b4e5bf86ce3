"""How many prompts x seeds the headline SceneEval set needs (issue 20 §2: overall 95% interval <= +-0.03).

:func:`simulate_halfwidth` draws synthetic SceneEval outcome tables and measures the half-width of the
prompt-clustered bootstrap interval of the overall score with the same code ``snapgen eval`` uses
(:func:`snapgen.eval.stats.bootstrap_scores`). Each prompt of a category gets its own success probability
``p_i ~ Beta`` with the category's mean and an intra-prompt correlation ``icc`` (``icc = 0``: every image
independent; ``icc = 1``: a prompt either always or never works), and each seed's image succeeds with
``p_i``. Per-category means default to the shipped model's (:data:`SHIPPED_LIKE`).

``python -m snapgen.eval.prompt_sizing`` prints the half-width for a grid of prompts per category and
icc at 4 seeds (the numbers in docs/evaluation.md, "Prompt sets").
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np

from .stats import bootstrap_scores

__all__ = ["SHIPPED_LIKE", "simulate_halfwidth", "simulate_table"]

SHIPPED_LIKE: dict[str, float] = {"single_object": 0.8, "two_object": 0.4, "counting": 0.4, "colors": 0.9,
                                  "position": 0.2, "color_attr": 0.2}


def simulate_table(n_prompts: int, n_seeds: int, icc: float, rng: np.random.Generator,
                   means: Mapping[str, float] = SHIPPED_LIKE) -> dict[str, np.ndarray]:
    """One synthetic per-category (prompts x seeds) 0/1 table (module docstring)."""
    if not 0.0 <= icc < 1.0:
        raise ValueError(f"icc must be in [0, 1), got {icc}")
    table = {}
    for tag, p in means.items():
        if icc == 0.0:
            pi = np.full(n_prompts, p)
        else:  # Beta(a, b) with mean p and icc = 1 / (a + b + 1)
            k = 1.0 / icc - 1.0
            pi = rng.beta(p * k, (1 - p) * k, n_prompts)
        table[tag] = (rng.random((n_prompts, n_seeds)) < pi[:, None]).astype(float)
    return table


def simulate_halfwidth(n_prompts: int, n_seeds: int = 4, icc: float = 0.3, n_sim: int = 20, n_boot: int = 400,
                       seed: int = 0, means: Mapping[str, float] = SHIPPED_LIKE) -> float:
    """Mean half-width ``(hi - lo) / 2`` of the overall score's bootstrap 95% interval over ``n_sim`` tables."""
    rng = np.random.default_rng(seed)
    widths = []
    for i in range(n_sim):
        ci = bootstrap_scores(simulate_table(n_prompts, n_seeds, icc, rng, means), n_boot=n_boot, seed=i)["overall"]
        widths.append((ci["hi"] - ci["lo"]) / 2)
    return float(np.mean(widths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Half-width of SceneEval's overall 95% interval vs set size.")
    ap.add_argument("--prompts", type=int, nargs="+", default=[12, 32, 48, 64, 80])
    ap.add_argument("--icc", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n-sim", type=int, default=20)
    args = ap.parse_args(argv)
    print("prompts/category  images  " + "  ".join(f"icc={c:.1f}" for c in args.icc))
    for n in args.prompts:
        hw = [simulate_halfwidth(n, args.seeds, c, n_sim=args.n_sim) for c in args.icc]
        print(f"{n:16d}  {6 * n * args.seeds:6d}  " + "  ".join(f"+-{h:.3f} " for h in hw))


if __name__ == "__main__":
    main()
