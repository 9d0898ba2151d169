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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.boltz_report import plot, summarise, table  # noqa: E402

PLOT_KEYS = ("reward/lddt_ca", "reward/clash", "train/kl", "eval/ca_lddt", "eval/clash_fraction")
LOSS_KEYS = ("reward/proxy", "reward/lddt_ca", "reward/clash", "reward/chain_break", "train/kl")


def train(seed: int, run_dir: Path, overrides: list[str], sft_dir: Path) -> float:
    """One GRPO run from the SFT run of the same seed; returns its wall-clock seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "run.py"), "experiment=boltz/grpo", f"seed={seed}",
           f"model.base_run={sft_dir / f'seed_{seed}'}", f"hydra.run.dir={run_dir}", "overwrite=true",
           "trainer.progress=false", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


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
    per_seed = {s: summarise(d, LOSS_KEYS, "min_reward_std") for s, d in run_dirs.items()}
    print(table(per_seed, "SFT → GRPO", LOSS_KEYS, strip=""))
    summary = {"seeds": per_seed, "seconds": seconds}
    (args.runs_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"curves: {plot(run_dirs, args.plot or args.runs_dir / 'curves.png', PLOT_KEYS, 5)}")


if __name__ == "__main__":
    main()
