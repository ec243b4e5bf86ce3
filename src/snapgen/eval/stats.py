"""Intervals and paired tests for SceneEval scores (issue 20 §3): the functional core, numpy + scipy only.

A SceneEval run scores every prompt of a prompt set under several seeds; the images of one prompt are not
independent draws (a prompt the model cannot do fails under every seed), so intervals come from a *clustered*
bootstrap over prompts: each resample draws, within every category, the prompts with replacement, each with all
of its seeds' images, and recomputes every category's accuracy and the overall score (GenEval's: the mean of the
categories). The interval so covers both sources of variation, prompts and seeds within a prompt. (Resampling the
seeds as a second, crossed factor was tried and rejected: with 4 seeds it inflates the interval of independent
outcomes by ~1.4x.) Percentile intervals.

Paired comparison of two runs on the same (prompt, seed) cells: the difference of each score with a paired
bootstrap interval (the same resample indices applied to both runs), per-image wins / losses / ties, and McNemar's
exact test (two-sided binomial test on the discordant pairs).

The alignment score gets the same clustered bootstrap with the per-image cosine in place of the 0/1 verdict
(:func:`score_table` with ``value="alignment", by_tag=False``: one cluster per prompt, all prompts pooled). The
Fréchet distance is a statistic of the whole image set and gets no interval here. Used by ``snapgen eval``
(:mod:`snapgen.eval.run`: ``intervals`` in summary.json) and ``snapgen eval --compare`` (:func:`compare_rows`).
McNemar's test pools all cells and so ignores the clustering by prompt (the bootstrap interval does not): read
its p-value as a per-image statement, the interval as the one about the prompt set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["INTERVAL_METHOD", "bootstrap_scores", "compare_rows", "first_mismatch", "mcnemar_exact",
           "paired_comparison", "paired_mean_difference", "score_table"]

INTERVAL_METHOD = ("percentile bootstrap, prompts resampled with replacement within each category with all their "
                   "seeds' images (prompt-clustered), {n_boot} resamples, {level:.0%}")


def score_table(results: Sequence[Mapping], value: str = "correct",
                by_tag: bool = True) -> tuple[dict[str, np.ndarray], list]:
    """Per-category arrays of shape (prompts, seeds) from result rows with ``tag``, ``prompt_index`` (or
    ``prompt``), ``seed`` and ``value`` (``correct``: 0/1; another key, e.g. ``alignment``: its float); also
    returns the sorted seed list. ``by_tag=False``: one table ``"all"`` over every prompt. Every prompt must have
    every seed."""
    seeds = sorted({r["seed"] for r in results})
    cells: dict[str, dict] = {}
    for r in results:
        key = r.get("prompt_index", r.get("prompt"))
        cells.setdefault(r["tag"] if by_tag else "all", {}).setdefault(key, {})[r["seed"]] = float(r[value])
    table = {}
    for tag, prompts in cells.items():
        rows = []
        for key in sorted(prompts, key=lambda k: (str(type(k)), k)):
            if set(prompts[key]) != set(seeds):
                raise ValueError(f"prompt {key!r} ({tag}) has seeds {sorted(prompts[key])}, expected {seeds}")
            rows.append([prompts[key][s] for s in seeds])
        table[tag] = np.asarray(rows, dtype=float)
    return table, seeds


def _scores(table: Mapping[str, np.ndarray], prompt_idx: Mapping[str, np.ndarray] | None = None,
            seed_idx: np.ndarray | None = None) -> dict[str, float]:
    out = {}
    for tag, m in table.items():
        if prompt_idx is not None:
            m = m[prompt_idx[tag]]
        if seed_idx is not None:
            m = m[:, seed_idx]
        out[tag] = float(m.mean())
    out["overall"] = float(np.mean([out[t] for t in table]))
    return out


def _resample_indices(table: Mapping[str, np.ndarray], rng: np.random.Generator):
    return ({t: rng.integers(0, m.shape[0], m.shape[0]) for t, m in table.items()},)


def bootstrap_scores(table: Mapping[str, np.ndarray], n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """``{score: {"value", "lo", "hi"}}`` for every category and ``overall`` (module docstring)."""
    if not table:
        raise ValueError("no scores to bootstrap")
    rng = np.random.default_rng(seed)
    point = _scores(table)
    draws = {k: np.empty(n_boot) for k in point}
    for b in range(n_boot):
        s = _scores(table, *_resample_indices(table, rng))
        for k, v in s.items():
            draws[k][b] = v
    a = (1.0 - level) / 2.0
    return {k: {"value": point[k], "lo": float(np.quantile(draws[k], a)), "hi": float(np.quantile(draws[k], 1 - a))}
            for k in point}


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``wins`` out of the ``wins + losses`` discordant
    pairs against p = 1/2 (1.0 when there is no discordant pair)."""
    n = wins + losses
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def paired_mean_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of ``b`` minus mean of ``a`` over paired samples (e.g. two models' validation losses on the same
    inputs), absolute and relative to ``a``'s mean, each with a percentile bootstrap interval over samples:
    ``{"a", "b", "diff", "lo", "hi", "rel", "rel_lo", "rel_hi"}`` (rel in percent). It covers the evaluation
    sample only, not training-seed variation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired samples must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    ma, mb = a[idx].mean(1), b[idx].mean(1)
    q = (1.0 - level) / 2.0
    diff, rel = mb - ma, (mb - ma) / ma * 100
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(b.mean() - a.mean()),
            "lo": float(np.quantile(diff, q)), "hi": float(np.quantile(diff, 1 - q)),
            "rel": float((b.mean() - a.mean()) / a.mean() * 100), "rel_lo": float(np.quantile(rel, q)),
            "rel_hi": float(np.quantile(rel, 1 - q))}


def paired_comparison(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """B minus A on the same cells: per category and overall ``{"a", "b", "diff", "lo", "hi", "wins", "losses",
    "ties", "p"}`` (wins: cells B got right and A wrong)."""
    if set(a) != set(b) or any(a[t].shape != b[t].shape for t in a):
        mism = sorted(set(a) ^ set(b)) or [t for t in a if a[t].shape != b[t].shape]
        raise ValueError(f"the two runs do not share their prompts and seeds (differ in: {', '.join(mism)})")
    rng = np.random.default_rng(seed)
    pa, pb = _scores(a), _scores(b)
    draws = {k: np.empty(n_boot) for k in pa}
    for i in range(n_boot):
        idx = _resample_indices(a, rng)
        sa, sb = _scores(a, *idx), _scores(b, *idx)
        for k in pa:
            draws[k][i] = sb[k] - sa[k]
    q = (1.0 - level) / 2.0
    out = {}
    for k in pa:
        tags = list(a) if k == "overall" else [k]
        wins = int(sum(((b[t] == 1) & (a[t] == 0)).sum() for t in tags))
        losses = int(sum(((b[t] == 0) & (a[t] == 1)).sum() for t in tags))
        ties = int(sum(a[t].size for t in tags)) - wins - losses
        out[k] = {"a": pa[k], "b": pb[k], "diff": pb[k] - pa[k], "lo": float(np.quantile(draws[k], q)),
                  "hi": float(np.quantile(draws[k], 1 - q)), "wins": wins, "losses": losses, "ties": ties,
                  "p": mcnemar_exact(wins, losses)}
    return out


def first_mismatch(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping]) -> str | None:
    """``None`` if the two runs score the same (prompt_index, seed) cells with the same prompt and tag, else a
    sentence naming the first cell that differs."""
    def cells(rows, name):
        out = {}
        for r in rows:
            if "prompt_index" not in r or "seed" not in r:
                raise ValueError(f"run {name}'s results have no prompt_index/seed (written before snapgen eval "
                                 f"recorded them): evaluate it again")
            out[(r["prompt_index"], r["seed"])] = (r["tag"], r["prompt"])
        return out

    a, b = cells(rows_a, "A"), cells(rows_b, "B")
    for key in sorted(set(a) | set(b)):
        if key not in b:
            return f"prompt {key[0]} seed {key[1]} ({a[key][1]!r}) is in A but not in B"
        if key not in a:
            return f"prompt {key[0]} seed {key[1]} ({b[key][1]!r}) is in B but not in A"
        if a[key] != b[key]:
            return f"prompt {key[0]} seed {key[1]} is {a[key][1]!r} ({a[key][0]}) in A but {b[key][1]!r} " \
                   f"({b[key][0]}) in B"
    return None


def compare_rows(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict[str, dict]:
    """:func:`paired_comparison` of two runs' result rows (``snapgen eval --compare``), per category and overall,
    plus ``alignment`` (diff and paired interval only) when both runs have per-image alignment. Raises
    ``ValueError`` naming the first mismatching cell when they do not share prompts and seeds."""
    problem = first_mismatch(rows_a, rows_b)
    if problem:
        raise ValueError(f"the two runs do not share their prompts and seeds: {problem}")
    out = paired_comparison(score_table(rows_a)[0], score_table(rows_b)[0], n_boot, level, seed)
    if all(r.get("alignment") is not None for r in (*rows_a, *rows_b)):
        al = paired_comparison(score_table(rows_a, "alignment", False)[0], score_table(rows_b, "alignment", False)[0],
                               n_boot, level, seed)["all"]
        out["alignment"] = {k: al[k] for k in ("a", "b", "diff", "lo", "hi")}
    return out
