"""Masked-LM GRPO evidence (issue 18): held-out reward and answer validity, shipped writer vs post-trained.

    python bench/molgen_mlm_grpo.py --train                          # train seeds 1 2 3, sampling seeds 0 1
    python bench/molgen_mlm_grpo.py --train --train-seeds 4 5 -- trainer.max_iterations=30
    python bench/molgen_mlm_grpo.py --post outputs/my_run --train-seeds 0 --sample-seeds 0

--train runs ``experiment=molgen/grpo_mlm seed=<t>`` into ``<runs-dir>/seed<t>`` (Hydra overrides after ``--``; a
finished run is reused, an interrupted one resumed). Every model answers each row of the prompt set's held-out
splits (validation + test: 30 rows, 10 per modality, none prompted in training) ``--samples-per-prompt`` times
after ``torch.manual_seed(<sampling seed>)``; the answers are scored by the reward the run trained with (its
``config.yaml``) through :class:`molgen_grpo.mlm_eval.MaskedLMEvaluator`. A pair (training seed,
sampling seed) compares the run's last checkpoint with the shipped writer sampled with the same seed.

Targets: the mean reward (penalties included) higher after training, and the share of tagged, valid answers not
lower by more than ``--valid-tolerance``, on every training seed (mean over sampling seeds). Then the scorer's
throughput (sequences/s of ``unmasked_mean`` and ``masked_pll``, bench/molgen_mlm_scorer.py). Prints the tables,
writes ``evidence.json``, ``evidence.md`` and ``curves.png`` (each run's held-out curves) to --out-dir (scores cached in ``<out-dir>/evals``); exit 1 when a
target fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean, median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WRITER = ROOT / "conf" / "model" / "molgen" / "qwen3_mlm_writer.yaml"
PROMPTS = "package:molgen_grpo/data/mlm_prompts"
KEYS = ("mlm_reward", "mlm_scored_mean", "tagged_frac", "valid_frac", "on_modality_frac")


def train(seed: int, runs_dir: Path, overrides: list[str]) -> Path:
    run = runs_dir / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "run.py"), "experiment=molgen/grpo_mlm", f"seed={seed}", f"hydra.run.dir={run}",
           "trainer.resume=auto", "trainer.progress=false", *overrides]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def run_reward(run: Path) -> dict[str, Any]:
    """The reward arguments the run trained with (its ``config.yaml``), without ``_target_`` and ``channel``."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if config is None:
        raise SystemExit(f"error: {run / 'config.yaml'} is missing: not a run directory (train it with --train)")
    reward = OmegaConf.to_container(config.reward, resolve=True)
    return {k: v for k, v in reward.items() if k not in ("_target_", "channel")}


def score(label: str, model: dict[str, Any], seed: int, reward: dict[str, Any],
          args: argparse.Namespace) -> dict[str, float]:
    """Held-out figures of one model and sampling seed under ``reward`` (cached by all three)."""
    key = hashlib.sha1(json.dumps(reward, sort_keys=True).encode()).hexdigest()[:8]
    cache = Path(args.out_dir) / "evals" / f"{label}_s{seed}_k{args.samples_per_prompt}_r{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from molgen_grpo.cli import build_policy
    from molgen_grpo.mlm_eval import MaskedLMEvaluator
    from molgen_grpo.mlm_reward import MaskedLMScore

    torch.set_num_threads(args.threads)
    policy, _ = build_policy(argparse.Namespace(**model, temperature=None, top_p=None, top_k=None,
                                                max_new_tokens=None, constrained=None))
    evaluator = MaskedLMEvaluator(MaskedLMScore(**reward), PROMPTS, ["validation", "test"], args.samples_per_prompt,
                                  seed)
    out = evaluator(policy)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


CURVES = ("eval/mlm_reward", "eval/mlm_scored_mean", "eval/valid_frac", "eval/smiles/valid_frac",
          "eval/protein/valid_frac", "eval/dna/valid_frac")


def plot_runs(runs: dict[str, Path], out: Path) -> Path:
    """Held-out curves of each run (its evaluations: start, every eval_interval, end), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elign.engine.metrics import read_metrics

    fig, axes = plt.subplots(2, 3, figsize=(12, 5.6))
    for label, run in runs.items():
        rows = [r for r in read_metrics(run) if "eval/mlm_reward" in r]
        for ax, key in zip(axes.flat, CURVES):
            pts = [(r["iteration"] + 1, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=label)
    for ax, key in zip(axes.flat, CURVES):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("masked-LM GRPO: held-out reward and answer validity per training seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def spread(values: list[float]) -> str:
    return f"{median(values):+.3f} [{min(values):+.3f}, {max(values):+.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the runs first (reused when finished)")
    parser.add_argument("--post", default=None, help="score this run directory instead of <runs-dir>/seed<t>")
    parser.add_argument("--runs-dir", default="outputs/molgen_mlm", help="where --train writes seed<t>/")
    parser.add_argument("--out-dir", default="outputs/molgen_mlm/evidence", help="evidence files and score cache")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    parser.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="answers per held-out prompt row")
    parser.add_argument("--valid-tolerance", type=float, default=0.0, help="largest allowed fall of valid_frac")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while scoring")
    parser.add_argument("--skip-throughput", action="store_true", help="do not time the scorer")
    parser.add_argument("--throughput-limit", type=int, default=30,
                        help="sequences per modality the scorer is timed on")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for training (after --)")
    args = parser.parse_args()
    runs_dir = ROOT / args.runs_dir if not Path(args.runs_dir).is_absolute() else Path(args.runs_dir)
    base_model = {"run_dir": None, "model_config": str(WRITER), "checkpoint": None}
    rows, verdicts, runs = [], [], {}
    for t in args.train_seeds:
        if args.post:
            run = Path(args.post)
        else:
            run = train(t, runs_dir, args.overrides) if args.train else runs_dir / f"seed{t}"
        post_model = {"run_dir": str(run), "model_config": None, "checkpoint": str(run / "checkpoint_latest.pth")}
        label = "post_" + (run.name if args.post else f"seed{t}")
        runs[run.name if args.post else f"seed {t}"] = run
        reward = run_reward(run)  # both models are scored by the reward the run trained on
        pairs = []
        for s in args.sample_seeds:
            base, post = score("base", base_model, s, reward, args), score(label, post_model, s, reward, args)
            pairs.append((base, post))
            rows.append({"train_seed": t, "sample_seed": s, "base": base, "post": post})
            print(f"train {t} sample {s}: reward {base['mlm_reward']:.3f} -> {post['mlm_reward']:.3f}, valid "
                  f"{base['valid_frac']:.3f} -> {post['valid_frac']:.3f}, on-modality {base['on_modality_frac']:.3f}"
                  f" -> {post['on_modality_frac']:.3f}", flush=True)
        d_reward = mean(p["mlm_reward"] - b["mlm_reward"] for b, p in pairs)
        d_valid = mean(p["valid_frac"] - b["valid_frac"] for b, p in pairs)
        verdicts.append({"train_seed": t, "d_reward": d_reward, "d_valid": d_valid,
                         "passed": d_reward > 0 and d_valid >= -args.valid_tolerance})
    lines = ["| train seed | sample seed | " + " | ".join(f"{k} base → post" for k in KEYS) + " |",
             "|---|---|" + "---:|" * len(KEYS)]
    for r in rows:
        lines.append(f"| {r['train_seed']} | {r['sample_seed']} | " + " | ".join(
            f"{r['base'][k]:.3f} → {r['post'][k]:.3f}" for k in KEYS) + " |")
    lines += ["", "| train seed | Δ reward (mean over sampling seeds) | Δ valid_frac | target met |",
              "|---|---:|---:|---|"]
    lines += [f"| {v['train_seed']} | {v['d_reward']:+.3f} | {v['d_valid']:+.3f} | {'yes' if v['passed'] else 'NO'} |"
              for v in verdicts]
    lines.append(f"\nΔ reward median [min, max] over training seeds: {spread([v['d_reward'] for v in verdicts])}; "
                 f"Δ valid_frac: {spread([v['d_valid'] for v in verdicts])}")
    per_modality = ["", "| modality | reward base → post (mean over pairs) | valid_frac base → post |",
                    "|---|---:|---:|"]
    for m in ("smiles", "protein", "dna"):
        per_modality.append(f"| {m} | {mean(r['base'][f'{m}/mlm_reward'] for r in rows):.3f} → "
                            f"{mean(r['post'][f'{m}/mlm_reward'] for r in rows):.3f} | "
                            f"{mean(r['base'][f'{m}/valid_frac'] for r in rows):.3f} → "
                            f"{mean(r['post'][f'{m}/valid_frac'] for r in rows):.3f} |")
    lines += per_modality
    throughput = []
    if not args.skip_throughput:
        from molgen_mlm_scorer import print_table, throughput as measure

        print(f"\nscorer throughput (shipped tiny masked LM, 1 thread, {args.throughput_limit} sequences per "
              "modality):")
        import torch

        torch.set_num_threads(1)
        throughput = measure("package:molgen_grpo/weights/mlm_tiny", PROMPTS + "/full.json", repeats=1,
                             limit=args.throughput_limit)
        print_table(throughput)
    print("\n".join(lines))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evidence.json").write_text(json.dumps({"pairs": rows, "verdicts": verdicts,
                                                       "throughput": throughput}, indent=1) + "\n")
    (out_dir / "evidence.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {plot_runs(runs, out_dir / 'curves.png')}")
    passed = all(v["passed"] for v in verdicts)
    print(f"\ntargets {'met' if passed else 'NOT met'} on {sum(v['passed'] for v in verdicts)}/{len(verdicts)} "
          f"training seeds; wrote {out_dir / 'evidence.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
