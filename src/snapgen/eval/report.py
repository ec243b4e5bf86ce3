"""Markdown for ``snapgen eval`` (issue 20 §3): the report of one run, every score with its 95% interval, and
the paired comparison of two runs (``--compare``). Pure formatting of summary.json / compare.json dicts."""

from __future__ import annotations

from pathlib import Path

__all__ = ["format_report", "format_comparison", "with_interval"]

FD_NOTE = ("FD is a statistic of the whole image set (generated vs real feature distributions), so it has no "
           "per-image interval; differences in FD below its real-vs-real spread (docs/evaluation.md) are noise")
MCNEMAR_NOTE = ("McNemar's exact p pools every (prompt, seed) cell and so ignores that the seeds of one prompt are "
                "correlated; the bootstrap interval of B - A resamples prompts and does not")


def with_interval(value, ci=None, digits: int = 3) -> str:
    """``0.493 [0.44, 0.55]`` (or ``0.493`` without an interval, ``-`` for None)."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci['lo']:.2f}, {ci['hi']:.2f}]"
    return text


def card_lines(card: dict) -> list[str]:
    """The detector card's headline figures (issue 20 §1): what the thresholds are, how right it is on real renders,
    how often it sees an object where there is none. Missing keys are skipped (older or custom cards)."""
    def get(*keys):
        d = card
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    out = []
    th = card.get("thresholds") or {}
    if th:
        out.append(f"- thresholds: detection {th.get('detection')}, counting prompts {th.get('counting')} (GenEval's)")
    ceil, acc = get("real_renders", "sceneeval_ceiling"), get("real_renders", "shape_accuracy_overall")
    if ceil or acc is not None:
        out.append("- real renders: " + ", ".join(
            ([f"SceneEval {k} {v:.3f}" for k, v in ceil.items()] if ceil else [])
            + ([f"shape accuracy {acc:.3f} (all degradations)"] if acc is not None else [])))
    neg = card.get("negatives_heldout") or {}
    if neg:
        out.append("- false objects per image, held-out negatives: " + ", ".join(
            f"{k} {v['false_per_image']:.3f}" for k, v in neg.items() if isinstance(v, dict) and "false_per_image" in v))
    noise = card.get("pure_noise") or {}
    objs = {k.split("/", 1)[1]: v for k, v in noise.items() if k.startswith("objects/")}
    if objs:
        out.append("- objects per pure-noise image: " + ", ".join(f"{k} {v:g}" for k, v in objs.items()))
    cal = card.get("calibration") or {}
    if "ece_after" in cal:
        out.append(f"- calibration: temperature {cal.get('temperature', float('nan')):.3f}, ECE "
                   f"{cal.get('ece_before', float('nan')):.3f} -> {cal['ece_after']:.3f}")
    return out


def format_report(summary: dict, grids: dict | None = None) -> str:
    s = summary["sceneeval"]
    iv = summary.get("intervals") or {}
    cats = [k for k in s if k != "overall"]
    source = (f"images from `{summary['images_dir']}`" if summary.get("images_dir") else
              f"{summary['steps']} steps, CFG {summary['cfg']}")
    lines = ["# snapgen eval", "",
             f"{summary['images']} images ({summary['prompts']} prompts x {summary['seeds']} seeds), "
             f"{source}, {summary['seconds']} s"
             + (f", variant {summary['variant']}" if summary.get("variant", "full") not in ("full", None) else ""),
             ""]
    if summary.get("prompt_set"):
        lines += [f"Prompt set: `{summary['prompt_set']}`", ""]
    lines += ["| score | value [95% interval] |", "|---|---|"]
    lines += [f"| {c} | {with_interval(s[c], iv.get(c))} |" for c in cats]
    lines += [f"| **overall** | **{with_interval(s['overall'], iv.get('overall'))}** |",
              f"| alignment | {with_interval(summary.get('alignment'), summary.get('alignment_interval'))} |",
              f"| FD | {with_interval(summary.get('fd'))} |", ""]
    if summary.get("interval_method"):
        lines += [f"Intervals: {summary['interval_method']}. {FD_NOTE}.", ""]
    card = summary.get("detector_card")
    if card:
        lines += ["## Detector (its card)", ""] + card_lines(card) + [""]
    loaded = [(k, summary.get(k)) for k in ("model", "images_dir", "detector", "image_encoder", "text_encoder")
              if summary.get(k)]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in loaded]
    attention = (summary.get("environment") or {}).get("numerics", {}).get("attention")
    if attention:
        chosen = ", ".join(sorted(set(attention["auto_choices"].values()))) or "-"
        lines.append(f"- BNA backend: requested {attention['requested']}, fused kernel {attention['kernel_status']}"
                     f", auto ran {chosen}")
    if loaded or attention:
        lines.append("")
    for n in summary.get("notes", []):
        lines.append(f"Note: {n}")
    if grids:
        lines += ["", "## Failures", ""]
        lines += [f"![{tag}](failures/{Path(p).name})" for tag, p in grids.items()]
    return "\n".join(lines) + "\n"


def format_comparison(comparison: dict) -> str:
    """compare.md from :func:`snapgen.eval.run.compare_runs`'s dict."""
    rows = comparison["scores"]
    lines = ["# snapgen eval --compare", "",
             f"A: `{comparison['a']}`", f"B: `{comparison['b']}`", "",
             f"{comparison['images']} images per run on the same prompts and seeds "
             f"({comparison['prompts']} prompts x {comparison['seeds']} seeds)", "",
             "| score | A | B | B - A [95% interval] | B wins | B losses | ties | McNemar exact p |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        name = f"**{k}**" if k == "overall" else k
        if "wins" in r:
            lines.append(f"| {name} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.3f} [{r['lo']:+.2f}, {r['hi']:+.2f}] "
                         f"| {r['wins']} | {r['losses']} | {r['ties']} | {r['p']:.3g} |")
        else:  # alignment: differences of a few thousandths, so three decimals
            lines.append(f"| {name} | {r['a']:.3f} | {r['b']:.3f} | {r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] "
                         f"| - | - | - | - |")
    lines += ["", f"Intervals: paired {comparison['interval_method']} (the same resample for A and B). "
                  f"{MCNEMAR_NOTE}. Wins: images B got right and A wrong.", ""]
    if comparison.get("fd"):
        lines += [f"FD: A {with_interval(comparison['fd']['a'])}, B {with_interval(comparison['fd']['b'])} "
                  f"(no interval: {FD_NOTE}).", ""]
    return "\n".join(lines)
