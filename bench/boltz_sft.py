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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.boltz_report import plot, summarise, table  # noqa: E402

PLOT_KEYS = ("train/loss_distogram", "train/loss_diffusion", "eval/ca_lddt", "eval/clash_fraction")
LOSS_KEYS = ("train/loss", "train/loss_distogram", "train/loss_mse", "train/loss_smooth_lddt")


def train(seed: int, run_dir: Path, overrides: list[str]) -> float:
    """One SFT run; returns its wall-clock seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "run.py"), "experiment=boltz/sft_lora", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "overwrite=true", "trainer.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


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
    per_seed = {s: summarise(d, LOSS_KEYS, "max_loss_slope") for s, d in run_dirs.items()}
    print(table(per_seed, "start → SFT", LOSS_KEYS, strip="train/"))
    summary = {"seeds": per_seed, "seconds": seconds}
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"curves: {plot(run_dirs, args.plot or args.runs_dir / 'curves.png', PLOT_KEYS, 20)}")
    if args.figures is not None:
        print("figures:", *figures(run_dirs[args.seeds[0]], args.figures), sep="\n  ")


if __name__ == "__main__":
    main()
