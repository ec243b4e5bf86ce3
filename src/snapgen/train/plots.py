"""Loss curves as PNG (matplotlib, headless): the trainer's ``loss.png``.

matplotlib is an optional extra (``pip install 'snapgen[plots]'``, part of ``snapgen[demo]``). Without it
training runs the same and writes no ``loss.png``; the first plot of the process prints one note saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.extras import MissingExtra, require

__all__ = ["plot_metrics"]

_noted = False  # the missing-matplotlib note is printed once per process


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> bool:
    """Plot ``metrics.jsonl`` to ``out_path``; ``False`` when nothing was plotted (no metrics yet, or
    matplotlib missing: then one note per process)."""
    global _noted
    try:
        matplotlib = require("matplotlib", "the training loss plot (loss.png)")
    except MissingExtra as e:
        if not _noted:
            print(f"note: {e}; training goes on without it")
            _noted = True
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return False
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not recs:
        return False
    steps = [r["step"] for r in recs]
    has_bins = any("loss_per_bin" in r for r in recs)
    fig, axes = plt.subplots(1, 2 if has_bins else 1, figsize=(11 if has_bins else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in recs], lw=1, label="loss")
    for key in sorted(k for k in recs[-1] if k.startswith("loss_") and k != "loss_per_bin"):
        ax.plot(steps, [r.get(key) for r in recs], lw=1, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_bins:
        ax = axes[0, 1]
        n = len(next(r["loss_per_bin"] for r in recs if "loss_per_bin" in r))
        for i in range(n):
            ax.plot(steps, [r.get("loss_per_bin", [None] * n)[i] for r in recs], lw=1,
                    label=f"t in [{i / n:.1f}, {(i + 1) / n:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("flow loss per time bin (t=1 noise)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(out_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return True
