"""Training curves of a run directory as PNG (domain-free: reads ``metrics.jsonl`` only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from elign.engine.metrics import read_metrics

DEFAULT_PREFIXES = ("reward/", "train/loss", "train/kl", "train/clip_frac", "train/grad_norm", "train/lr",
                    "rollout/", "eval/")
SKIP_SUFFIXES = ("_failed", "_std")


def plot_curves(run_dir: str | Path, out: str | Path | None = None, keys: Sequence[str] | None = None,
                smooth: int = 5) -> Path:
    """One panel per metric against the iteration, raw (faint) and moving-averaged over ``smooth``.

    Args:
        run_dir: a run directory (with ``metrics.jsonl``).
        out: PNG path; default ``<run_dir>/curves.png``.
        keys: metrics to plot; default: rewards, losses, KL, clip fraction, rollout and eval metrics.
        smooth: moving-average window (iterations).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no iterations")
    present = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    if keys is None:
        keys = [k for k in present if k.startswith(DEFAULT_PREFIXES) and not k.endswith(SKIP_SUFFIXES)]
    keys = [k for k in keys if k in present]
    if not keys:
        raise ValueError(f"none of the requested metrics are in {run_dir}: available {present}")
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, color="tab:blue", alpha=0.3 if len(y) > smooth else 1.0, lw=1, marker="o" if len(y) < 20 else None, ms=3)
        if len(y) > smooth:
            avg = [sum(y[max(0, i - smooth + 1):i + 1]) / len(y[max(0, i - smooth + 1):i + 1]) for i in range(len(y))]
            ax.plot(x, avg, color="tab:blue", lw=1.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name, fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
