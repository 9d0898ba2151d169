"""Shipped pretrained conformer LM vs GRPO-post-trained, over training and sampling seeds.

    python bench/molgen_evidence.py --train                                  # train seeds 1 2 3, sample seeds 0 1
    python bench/molgen_evidence.py --train --constrained --experiment molgen/grpo_conformer_constrained
    python bench/molgen_evidence.py --train --train-seeds 4 5 --sample-seeds 2 -- trainer.max_iterations=80
    python bench/molgen_evidence.py --post outputs/molgen/grpo_default --train-seeds 0 --sample-seeds 0

--train runs ``experiment=<--experiment> seed=<t>`` (default ``molgen/grpo_conformer``) into ``<runs-dir>/seed<t>`` (extra Hydra
overrides after ``--``; a finished run is reused, an interrupted one resumed). Every model is scored
on the held-out molecules of the test and valid splits (152 in the shipped data; none is prompted in
training) with the protocol of spec §1.7: 2 x M unconstrained completions per molecule (--constrained: every
model with constrained decoding; a run's own decoding mode is never used), symmetry-aware
RMSD, COV-R / MAT-R. The post-trained model is the run's *last* checkpoint (the recipe's best
checkpoint was chosen on the first valid molecules, so it would not be held out). A pair (training
seed, sampling seed) compares it with the shipped model sampled with the same seed.

Targets (issue 15): COV-R at 0.5 Å up by >= 5 points or MAT-R down by >= 10 %, with the parse rate not
lower, on every training seed (mean over sampling seeds) and on the aggregate. Prints the per-pair
table and the aggregate (median, min-max), writes ``evidence.json`` and ``evidence.md`` to
--out-dir; scores are cached in ``<out-dir>/evals``. Exit code 1 when a target fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "conf" / "model" / "molgen" / "qwen3_small_qm9.yaml"
DATA = "package:molgen_grpo/data/qm9_conformers"
KEYS = ("cov_r_0.5", "cov_r_0.75", "mat_r", "parse_rate", "graph_match_rate")


def train(seed: int, runs_dir: Path, overrides: list[str], experiment: str = "molgen/grpo_conformer") -> Path:
    run = runs_dir / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "run.py"), f"experiment={experiment}", f"seed={seed}",
           f"hydra.run.dir={run}", "trainer.resume=auto", "trainer.progress=false", *overrides]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def score(label: str, model: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Headline scores of one model and sampling seed on test + valid (cached)."""
    sized = "" if args.max_molecules is None else f"_m{args.max_molecules}"
    mode = "_constrained" if args.constrained else ""
    cache = Path(args.out_dir) / "evals" / f"{label}_s{seed}_k{args.samples_per_reference}{sized}{mode}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from molgen_grpo.cli import build_policy
    from molgen_grpo.evaluate import load_test_molecules, sample_completions, score_molecule, summarize

    torch.set_num_threads(args.threads)
    policy, _ = build_policy(argparse.Namespace(**model, temperature=None, top_p=None, top_k=None,
                                                max_new_tokens=None, constrained=args.constrained))
    molecules = [m for split in ("test", "valid") for m in load_test_molecules(DATA, split, args.max_molecules)]
    completions = sample_completions(policy, molecules, args.samples_per_reference, seed)
    summary = summarize(score_molecule(m, c) for m, c in zip(molecules, completions))
    out = {"cov_r_0.5": summary["at_0.5"]["cov_r_mean"], "cov_r_0.75": summary["at_0.75"]["cov_r_mean"],
           "mat_r": summary["at_0.5"]["mat_r_mean"], "parse_rate": summary["parse_rate"],
           "graph_match_rate": summary["graph_match_rate"], "molecules": len(molecules),
           "completions": summary["completions"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def deltas(post: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {"cov_r_0.5": 100 * (post["cov_r_0.5"] - base["cov_r_0.5"]),
            "cov_r_0.75": 100 * (post["cov_r_0.75"] - base["cov_r_0.75"]),
            "mat_r": 100 * (post["mat_r"] / base["mat_r"] - 1), "parse_rate": 100 * (post["parse_rate"] - base["parse_rate"])}


def passes(d: dict[str, float]) -> bool:
    return (d["cov_r_0.5"] >= 5.0 or d["mat_r"] <= -10.0) and d["parse_rate"] >= 0.0


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="post-train one run per training seed")
    p.add_argument("--post", action="append", default=[], help="post-trained run directory (one per training seed)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--experiment", default="molgen/grpo_conformer", help="recipe that --train runs")
    p.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples-per-reference", type=int, default=2, help="completions per reference (the protocol's 2)")
    p.add_argument("--max-molecules", type=int, default=None, help="the first N molecules of each split (smoke tests)")
    p.add_argument("--runs-dir", default=None,
                   help="--train writes <runs-dir>/seed<t> (default: outputs/molgen/evidence, or "
                        "outputs/molgen/evidence/<recipe> for another --experiment, so recipes never share a run)")
    p.add_argument("--out-dir", default=None, help="tables, JSON and the score cache (default: the runs directory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--constrained", action="store_true",
                   help="score every model with constrained decoding (default: unconstrained, the protocol); "
                        "a run's own decoding mode is never used, so both sides sample the same way")
    args = p.parse_args(argv)
    if args.runs_dir is None:
        recipe = args.experiment.split("/")[-1]
        args.runs_dir = "outputs/molgen/evidence" + ("" if recipe == "grpo_conformer" else f"/{recipe}")
    args.out_dir = args.out_dir or args.runs_dir
    if args.train:
        runs = [train(s, Path(args.runs_dir), extra, args.experiment) for s in args.train_seeds]
    else:
        runs = [Path(r) for r in args.post]
        if len(runs) != len(args.train_seeds):
            p.error("give one --post per --train-seeds entry (or --train)")
    base_model = {"run_dir": None, "model_config": str(SHIPPED), "checkpoint": None}
    base = {s: score("shipped", base_model, s, args) for s in args.sample_seeds}
    rows, per_seed = [], {}
    for t, run in zip(args.train_seeds, runs):
        model = {"run_dir": str(run), "model_config": None, "checkpoint": str(run / "checkpoint_latest.pth")}
        pair_deltas = []
        for s in args.sample_seeds:
            post = score(f"{run.name}_{hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:8]}", model, s, args)
            d = deltas(post, base[s])
            pair_deltas.append(d)
            rows.append({"train_seed": t, "sample_seed": s, "base": base[s], "post": post, "delta": d})
        per_seed[t] = {k: sum(d[k] for d in pair_deltas) / len(pair_deltas) for k in pair_deltas[0]}
    agg = {k: median(r["delta"][k] for r in rows) for k in rows[0]["delta"]}
    spread = {k: (min(r["delta"][k] for r in rows), max(r["delta"][k] for r in rows)) for k in rows[0]["delta"]}
    lines = ["| train seed | sample seed | COV-R 0.5 Å base → post | COV-R 0.75 Å base → post | MAT-R (Å) base → post | parse base → post |",
             "|---:|---:|---|---|---|---|"]
    for r in rows:
        b, q, d = r["base"], r["post"], r["delta"]
        lines.append(f"| {r['train_seed']} | {r['sample_seed']} | {100*b['cov_r_0.5']:.1f} → {100*q['cov_r_0.5']:.1f} ({d['cov_r_0.5']:+.1f} pts) "
                     f"| {100*b['cov_r_0.75']:.1f} → {100*q['cov_r_0.75']:.1f} ({d['cov_r_0.75']:+.1f} pts) "
                     f"| {b['mat_r']:.3f} → {q['mat_r']:.3f} ({d['mat_r']:+.1f} %) "
                     f"| {100*b['parse_rate']:.1f} → {100*q['parse_rate']:.1f} % ({d['parse_rate']:+.1f} pts) |")
    lines.append("")
    lines.append("aggregate over pairs (median [min, max]): " + ", ".join(
        f"{k} {agg[k]:+.1f} [{spread[k][0]:+.1f}, {spread[k][1]:+.1f}]" for k in agg) + " (COV and parse in points, MAT-R in %)")
    verdicts = {f"training seed {t}": passes(d) for t, d in per_seed.items()}
    verdicts["aggregate"] = passes(agg)
    lines.append("targets (COV-R 0.5 +5 pts or MAT-R -10 %, parse not lower): " +
                 ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts.items()))
    text = "\n".join(lines)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.md").write_text(text + "\n")
    (out / "evidence.json").write_text(json.dumps({"pairs": rows, "per_training_seed": per_seed, "aggregate": agg,
                                                    "spread": spread, "verdicts": verdicts, "overrides": extra}, indent=2))
    sys.exit(0 if all(verdicts.values()) else 1)


if __name__ == "__main__":
    main()
