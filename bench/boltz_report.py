"""What the Boltz evidence benches (bench/boltz_sft.py, bench/boltz_grpo.py) share: per-run summaries of
``metrics.jsonl`` and ``acceptance.json``, the per-seed markdown table and the curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elign.engine.metrics import read_metrics  # noqa: E402

EVAL_KEYS = ("eval/ca_lddt", "eval/rmsd_ca", "eval/tm_score", "eval/clash_fraction", "eval/distogram_ce")


def summarise(run_dir: Path, loss_keys: Sequence[str], check: str) -> dict[str, float]:
    """Start / end evaluation, the first and last 10 % of ``loss_keys`` (rows holding ``loss_keys[0]``) and the
    acceptance verdict, with the value of its check ``check``, of one run directory."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/ca_lddt" in r]
    train_rows = [r for r in rows if r["iteration"] >= 0 and loss_keys[0] in r]
    window = max(1, len(train_rows) // 10)
    out: dict[str, float] = {}
    for key in EVAL_KEYS:
        out[f"{key}@start"], out[f"{key}@end"] = float(evals[0][key]), float(evals[-1][key])
    for key in loss_keys:
        values = [r[key] for r in train_rows if key in r]
        out[f"{key}@first"], out[f"{key}@last"] = float(np.mean(values[:window])), float(np.mean(values[-window:]))
    verdict = json.loads((run_dir / "acceptance.json").read_text())
    out["acceptance_passed"] = float(verdict["passed"])
    out[check] = float(verdict["checks"][check]["value"])
    return out


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(per_seed: dict[int, dict[str, float]], change: str, loss_keys: Sequence[str], strip: str = "") -> str:
    """Markdown: one row per evaluation metric (``change``, e.g. "start → SFT") and per loss key (``strip``
    removed from its label), a column per seed and the mean [min, max] of the change."""
    seeds = sorted(per_seed)
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    rows = [(f"{k.removeprefix('eval/')} {change}", f"{k}@start", f"{k}@end") for k in EVAL_KEYS]
    rows += [(f"{k.removeprefix(strip)} first → last 10 %", f"{k}@first", f"{k}@last") for k in loss_keys]
    for label, a, b in rows:
        cells = [f"{per_seed[s][a]:.3f} → {per_seed[s][b]:.3f}" for s in seeds]
        change = [per_seed[s][b] - per_seed[s][a] for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | Δ {spread(change)} |")
    lines.append("| acceptance | " + " | ".join("PASS" if per_seed[s]["acceptance_passed"] else "FAIL"
                                               for s in seeds) + " | |")
    return "\n".join(lines)


def plot(run_dirs: dict[int, Path], out: Path, keys: Sequence[str], window: int) -> Path:
    """One panel per metric, a line per seed; training metrics moving-averaged over ``window`` iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for seed, run_dir in sorted(run_dirs.items()):
        rows = read_metrics(run_dir)
        for ax, key in zip(axes, keys):
            pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            if not key.startswith("eval/") and len(y) > window:  # one crop or rollout per step is noisy
                y = np.convolve(y, np.ones(window) / window, mode="valid")
                x = x[window - 1:]
            ax.plot(x, y, marker="o" if key.startswith("eval/") else None, label=f"seed {seed}")
    for ax, key in zip(axes, keys):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration (-1 = starting model)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
