"""snapgen.eval.stats: clustered bootstrap intervals and the exact paired test, against slow obvious references."""

import math

import numpy as np
import pytest

from snapgen.eval.stats import bootstrap_scores, mcnemar_exact, paired_comparison, score_table


def _iid_table(rng, p, prompts=40, seeds=4, tags=("a", "b")):
    return {t: (rng.random((prompts, seeds)) < p).astype(float) for t in tags}


def test_interval_of_independent_outcomes_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    table = {"a": (rng.random((200, 4)) < 0.5).astype(float)}
    ci = bootstrap_scores(table, n_boot=1000)["a"]
    half = 1.96 * math.sqrt(0.25 / 800)  # 800 independent Bernoulli(0.5) cells
    assert ci["value"] == pytest.approx(table["a"].mean())
    assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(half, rel=0.2)


def test_clustered_interval_is_wider_when_a_prompt_fails_or_passes_under_every_seed():
    rng = np.random.default_rng(1)
    per_prompt = (rng.random((50, 1)) < 0.5).astype(float)
    clustered = {"a": np.repeat(per_prompt, 4, axis=1)}  # perfectly correlated within prompt: 50 draws, not 200
    iid = {"a": (rng.random((50, 4)) < 0.5).astype(float)}
    w_c = bootstrap_scores(clustered, n_boot=800)["a"]
    w_i = bootstrap_scores(iid, n_boot=800)["a"]
    assert (w_c["hi"] - w_c["lo"]) > 1.6 * (w_i["hi"] - w_i["lo"])  # sqrt(4) = 2 in expectation


def test_overall_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    runs = 100
    for _ in range(runs):
        ci = bootstrap_scores(_iid_table(rng, 0.6, prompts=30), n_boot=300, seed=int(rng.integers(1 << 30)))
        covered += ci["overall"]["lo"] <= 0.6 <= ci["overall"]["hi"]
    assert 0.86 <= covered / runs <= 1.0


def test_bootstrap_is_deterministic_given_its_seed():
    table = _iid_table(np.random.default_rng(3), 0.5)
    assert bootstrap_scores(table, n_boot=200, seed=5) == bootstrap_scores(table, n_boot=200, seed=5)
    assert bootstrap_scores(table, n_boot=200, seed=5) != bootstrap_scores(table, n_boot=200, seed=6)


def test_mcnemar_equals_the_hand_computed_binomial_sum():
    def ref(w, l):
        n, k = w + l, min(w, l)
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)

    for w, l in [(0, 0), (3, 3), (10, 2), (1, 12), (25, 14)]:
        assert mcnemar_exact(w, l) == pytest.approx(ref(w, l) if w + l else 1.0, rel=1e-9)


def test_paired_comparison_of_a_run_with_itself_and_with_a_known_improvement():
    rng = np.random.default_rng(4)
    a = _iid_table(rng, 0.4, prompts=60)
    same = paired_comparison(a, a, n_boot=300)
    assert all(v["diff"] == 0 and v["lo"] == 0 == v["hi"] and v["p"] == 1.0 and v["wins"] == 0 for v in same.values())
    b = {t: np.maximum(m, (rng.random(m.shape) < 0.5)) for t, m in a.items()}  # B only ever fixes A's failures
    r = paired_comparison(a, b, n_boot=500)
    assert r["overall"]["losses"] == 0 and r["overall"]["wins"] > 50 and r["overall"]["p"] < 1e-6
    assert r["overall"]["lo"] > 0 and r["overall"]["diff"] == pytest.approx(r["overall"]["b"] - r["overall"]["a"])


def test_runs_on_different_cells_are_refused():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="do not share"):
        paired_comparison(_iid_table(rng, 0.5, prompts=10), _iid_table(rng, 0.5, prompts=11))


def test_score_table_from_result_rows_and_a_missing_seed_is_an_error():
    rows = [{"tag": "counting", "prompt_index": i, "seed": s, "correct": (i + s) % 2 == 0}
            for i in range(3) for s in range(2)]
    table, seeds = score_table(rows)
    assert seeds == [0, 1] and table["counting"].tolist() == [[1, 0], [0, 1], [1, 0]]
    with pytest.raises(ValueError, match="expected"):
        score_table(rows[:-1])


def test_intervals_shrink_with_more_prompts():
    rng = np.random.default_rng(6)
    widths = []
    for prompts in (12, 48, 192):
        cis = [bootstrap_scores(_iid_table(rng, 0.5, prompts=prompts), n_boot=300, seed=k)["overall"] for k in range(4)]
        widths.append(np.mean([ci["hi"] - ci["lo"] for ci in cis]))
    assert widths[0] > 1.5 * widths[1] and widths[1] > 1.5 * widths[2], widths  # ~1/sqrt(prompts): 2x per 4x


def test_alignment_table_is_one_float_cluster_per_prompt_over_all_tags():
    rows = [{"tag": t, "prompt_index": i, "seed": s, "correct": True, "alignment": 0.1 * i + 0.01 * s}
            for i, t in enumerate(["colors", "position", "colors"]) for s in range(2)]
    table, seeds = score_table(rows, "alignment", by_tag=False)
    assert list(table) == ["all"] and np.allclose(table["all"], [[0.0, 0.01], [0.1, 0.11], [0.2, 0.21]])
    ci = bootstrap_scores(table, n_boot=200)["all"]
    assert ci["value"] == pytest.approx(0.105) and 0.0 <= ci["lo"] < ci["value"] < ci["hi"] <= 0.21


def test_first_mismatch_names_the_cell():
    from snapgen.eval.stats import first_mismatch

    rows = [{"tag": "colors", "prompt": f"p{i}", "prompt_index": i, "seed": s, "correct": True}
            for i in range(3) for s in range(2)]
    assert first_mismatch(rows, rows) is None
    assert first_mismatch(rows, rows[1:]) == "prompt 0 seed 0 ('p0') is in A but not in B"
    swapped = [{**r, "tag": "position"} if r["prompt_index"] == 2 else r for r in rows]
    assert "prompt 2 seed 0 is 'p2' (colors) in A but 'p2' (position) in B" == first_mismatch(rows, swapped)


def test_paired_mean_difference_against_the_obvious_numbers():
    from snapgen.eval.stats import paired_mean_difference

    rng = np.random.default_rng(0)
    a = rng.random(2000) + 1.0
    b = 1.05 * a + rng.normal(0, 0.01, a.size)       # 5% worse, tightly paired
    d = paired_mean_difference(a, b, n_boot=500)
    assert d["diff"] == pytest.approx(b.mean() - a.mean()) and d["rel"] == pytest.approx(5.0, abs=0.05)
    assert d["rel_lo"] < d["rel"] < d["rel_hi"] and d["rel_hi"] - d["rel_lo"] < 0.2
    # pairing matters: the interval of the same means from independent samples is far wider
    u = paired_mean_difference(a, rng.permutation(b), n_boot=500)
    assert (u["rel_hi"] - u["rel_lo"]) > 5 * (d["rel_hi"] - d["rel_lo"])
    # the interval is the bootstrap's: against the normal approximation of the paired differences
    se = np.std(b - a, ddof=1) / math.sqrt(a.size)
    assert (d["hi"] - d["lo"]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="paired samples"):
        paired_mean_difference(a, b[:-1])
