"""Evidence for Boltz-2 LoRA SFT: the recipe over several seeds, starting model vs SFT model.

    python bench/boltz_sft.py --seeds 1 2 3                      # train (if needed) and report
    python bench/boltz_sft.py --seeds 1 2 3 --report-only        # report existing runs

Each seed is one ``python run.py experiment=boltz/sft_lora seed=<s>`` run (the seed draws the random tiny
Boltz2, the adapters and the crops; the evaluation's crops and sampling noise are the recipe's fixed ones),
so the starting model (iteration -1 of ``metrics.jsonl``) and the SFT model are evaluated on the same
crops with the same noise. Prints a markdown table (Cα-lDDT, RMSD, TM-score, clash fraction, distogram
CE before and after; loss in the first and last 10 % of steps; acceptance verdict) with the mean and
[min, max] over seeds, writes ``summary.json`` and a PNG of the curves.
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
LOSS_KEYS = ("train/loss", "train/loss_distogram", "train/loss_mse", "train/loss_smooth_lddt")


def train(seed: int, run_dir: Path, overrides: list[str]) -> float:
    """One SFT run; returns its wall-clock seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "run.py"), "experiment=boltz/sft_lora", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "overwrite=true", "trainer.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def summarise(run_dir: Path) -> dict[str, float]:
    """Start / end evaluation, loss windows and acceptance of one run directory."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/ca_lddt" in r]
    train_rows = [r for r in rows if r["iteration"] >= 0 and "train/loss" in r]
    window = max(1, len(train_rows) // 10)
    out: dict[str, float] = {}
    for key in EVAL_KEYS:
        out[f"{key}@start"], out[f"{key}@end"] = float(evals[0][key]), float(evals[-1][key])
    for key in LOSS_KEYS:
        values = [r[key] for r in train_rows if key in r]
        out[f"{key}@first"], out[f"{key}@last"] = float(np.mean(values[:window])), float(np.mean(values[-window:]))
    verdict = json.loads((run_dir / "acceptance.json").read_text())
    out["acceptance_passed"] = float(verdict["passed"])
    out["loss_slope"] = float(verdict["checks"]["max_loss_slope"]["value"])
    return out


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(per_seed: dict[int, dict[str, float]]) -> str:
    seeds = sorted(per_seed)
    lines = ["| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    rows = [(f"{k.removeprefix('eval/')} start → SFT", f"{k}@start", f"{k}@end") for k in EVAL_KEYS]
    rows += [(f"{k.removeprefix('train/')} first → last 10 %", f"{k}@first", f"{k}@last") for k in LOSS_KEYS]
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

    keys = ("train/loss_distogram", "train/loss_diffusion", "eval/ca_lddt", "eval/clash_fraction")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for seed, run_dir in sorted(run_dirs.items()):
        rows = read_metrics(run_dir)
        for ax, key in zip(axes, keys):
            pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            if key.startswith("train/") and len(y) > 20:  # moving average: one crop per step is noisy
                y = np.convolve(y, np.ones(20) / 20, mode="valid")
                x = x[19:]
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


def figures(run_dir: Path, out_dir: Path) -> list[Path]:
    """Distance maps and per-residue lDDT of one run's starting model and SFT model (the evaluator's own
    plots: the first evaluation is the starting model, the second the run's latest checkpoint)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    evaluator = instantiate(cfg.evaluator, out_dir=str(out_dir), write_structures=False)
    cfg.model.checkpoint = None
    evaluator.label = "starting model"
    evaluator(instantiate(cfg.model))  # the starting model: the run's seed, adapters at B = 0
    cfg.model.checkpoint = str(run_dir / "checkpoint_latest.pth")
    evaluator.label = f"SFT, {cfg.trainer.max_iterations} steps"
    evaluator(instantiate(cfg.model))
    return sorted((out_dir / "predictions").glob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "boltz_sft", help="one run per seed")
    parser.add_argument("--report-only", action="store_true", help="do not train; report existing runs")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default <runs-dir>/curves.png)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="also write the first seed's starting-vs-SFT distance maps and per-residue lDDT here")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides for every seed")
    args = parser.parse_args()
    run_dirs = {s: args.runs_dir / f"seed_{s}" for s in args.seeds}
    seconds = {}
    for seed, run_dir in run_dirs.items():
        if not args.report_only and not (run_dir / "acceptance.json").is_file():
            seconds[seed] = train(seed, run_dir, args.overrides)
            print(f"seed {seed}: {seconds[seed]:.0f} s", flush=True)
    per_seed = {s: summarise(d) for s, d in run_dirs.items()}
    print(table(per_seed))
    summary = {"seeds": per_seed, "seconds": seconds}
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"curves: {plot(run_dirs, args.plot or args.runs_dir / 'curves.png')}")
    if args.figures is not None:
        print("figures:", *figures(run_dirs[args.seeds[0]], args.figures), sep="\n  ")


if __name__ == "__main__":
    main()
