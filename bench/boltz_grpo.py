"""Evidence for Boltz-2 GRPO after SFT: the GRPO recipe from each SFT seed's adapters, SFT model vs GRPO model.

    python bench/boltz_grpo.py --seeds 1 2 3                 # needs outputs/boltz_sft/seed_<s> (bench/boltz_sft.py)
    python bench/boltz_grpo.py --seeds 1 2 3 --report-only

Each seed is one ``python run.py experiment=boltz/grpo seed=<s> model.base_run=<SFT run of seed s>`` run: the
SFT adapters are merged into the base, so iteration -1 of ``metrics.jsonl`` evaluates the SFT model and the
last evaluation the GRPO model, on the evaluator's fixed crops and sampling noise. Prints a markdown table
(Cα-lDDT, RMSD, TM-score, clash fraction before and after; reward in the first and last 10 % of iterations;
acceptance verdict) with the mean and [min, max] over seeds, writes ``summary.json`` and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elign.engine.metrics import read_metrics  # noqa: E402

EVAL_KEYS = ("eval/ca_lddt", "eval/rmsd_ca", "eval/tm_score", "eval/clash_fraction", "eval/distogram_ce")
LOSS_KEYS = ("reward/proxy", "reward/lddt_ca", "reward/clash", "train/kl")


def train(seed: int, run_dir: Path, overrides: list[str], sft_dir: Path) -> float:
    """One GRPO run from the SFT run of the same seed; returns its wall-clock seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "run.py"), "experiment=boltz/grpo", f"seed={seed}",
           f"model.base_run={sft_dir / f'seed_{seed}'}", f"hydra.run.dir={run_dir}", "overwrite=true",
           "trainer.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def summarise(run_dir: Path) -> dict[str, float]:
    """Start / end evaluation, loss windows and acceptance of one run directory."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/ca_lddt" in r]
    train_rows = [r for r in rows if r["iteration"] >= 0 and "reward/proxy" in r]
    window = max(1, len(train_rows) // 10)
    out: dict[str, float] = {}
    for key in EVAL_KEYS:
        out[f"{key}@start"], out[f"{key}@end"] = float(evals[0][key]), float(evals[-1][key])
    for key in LOSS_KEYS:
        values = [r[key] for r in train_rows if key in r]
        out[f"{key}@first"], out[f"{key}@last"] = float(np.mean(values[:window])), float(np.mean(values[-window:]))
    verdict = json.loads((run_dir / "acceptance.json").read_text())
    out["acceptance_passed"] = float(verdict["passed"])
    out["reward_group_std"] = float(verdict["checks"]["min_reward_std"]["value"])
    return out


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(per_seed: dict[int, dict[str, float]]) -> str:
    seeds = sorted(per_seed)
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    rows = [(f"{k.removeprefix('eval/')} SFT → GRPO", f"{k}@start", f"{k}@end") for k in EVAL_KEYS]
    rows += [(f"{k} first → last 10 %", f"{k}@first", f"{k}@last") for k in LOSS_KEYS]
    for label, a, b in rows:
        cells = [f"{per_seed[s][a]:.3f} → {per_seed[s][b]:.3f}" for s in seeds]
        change = [per_seed[s][b] - per_seed[s][a] for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | Δ {spread(change)} |")
    lines.append("| acceptance | " + " | ".join("PASS" if per_seed[s]["acceptance_passed"] else "FAIL"
                                               for s in seeds) + " | |")
    return "\n".join(lines)


def plot(run_dirs: dict[int, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward/proxy", "train/kl", "eval/ca_lddt", "eval/clash_fraction")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for seed, run_dir in sorted(run_dirs.items()):
        rows = read_metrics(run_dir)
        for ax, key in zip(axes, keys):
            pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            if not key.startswith("eval/") and len(y) > 5:  # moving average: one rollout per step is noisy
                y = np.convolve(y, np.ones(5) / 5, mode="valid")
                x = x[4:]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "boltz_grpo", help="one run per seed")
    parser.add_argument("--sft-dir", type=Path, default=ROOT / "outputs" / "boltz_sft",
                        help="the SFT runs (seed_<s>) each GRPO run starts from")
    parser.add_argument("--report-only", action="store_true", help="do not train; report existing runs")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default <runs-dir>/curves.png)")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides for every seed")
    args = parser.parse_args()
    run_dirs = {s: args.runs_dir / f"seed_{s}" for s in args.seeds}
    seconds = {}
    for seed, run_dir in run_dirs.items():
        if not args.report_only and not (run_dir / "acceptance.json").is_file():
            seconds[seed] = train(seed, run_dir, args.overrides, args.sft_dir)
            print(f"seed {seed}: {seconds[seed]:.0f} s", flush=True)
    per_seed = {s: summarise(d) for s, d in run_dirs.items()}
    print(table(per_seed))
    summary = {"seeds": per_seed, "seconds": seconds}
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"curves: {plot(run_dirs, args.plot or args.runs_dir / 'curves.png')}")


if __name__ == "__main__":
    main()
