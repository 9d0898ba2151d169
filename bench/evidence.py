"""Base vs post-trained EDM over several training and sampling seeds: does FED-GRPO move the physics?

    python bench/evidence.py --train                                  # 3 training seeds x 2 sampling seeds (the defaults)
    python bench/evidence.py --train --train-seeds 4 5 6 --sample-seeds 2 3 -- trainer.max_iterations=120
    python bench/evidence.py --post outputs/evidence/seed1 --post outputs/evidence/seed2   # runs trained elsewhere
    python bench/evidence.py --post RUN --train-seeds 0 --sample-seeds 0 --num 512          # one pair

--train post-trains one run per training seed (``experiment=edm/elign seed=<t>`` into
``<runs-dir>/seed<t>``, resumed if it was interrupted, skipped if it finished). Each post-trained model
(its ``checkpoint_best.pth``, chosen on the recipe's held-out sample, else ``checkpoint_latest.pth``)
and the base are sampled with every sampling seed, ``--num`` molecules each. A pair (training seed,
sampling seed) compares the post-trained model and the base on the same seed: same node counts, same
initial noise. Every molecule is scored as sampled (never repaired): stability, RDKit validity /
uniqueness with the project's bond inference, fragments, GFN2-xTB force RMS and formation energy.

Printed and written to --out-dir: the per-pair changes, the values table, the targets on every
training seed and on the aggregate (PASS needs all of them), ``evidence.json``, ``evidence.md``,
``force_rms.png`` (per-molecule force RMS, base vs each seed) and ``curves.png`` (the runs' held-out
evaluations from iteration 0). Evaluations are cached in ``<out-dir>/evals/``, so an interrupted
bench picks up where it stopped. Exit code 1 when a target fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elign.edm.cli import XTB_REFS, build_policy, make_force_field  # noqa: E402
from elign.edm.evaluate import sample_molecules, score_samples, summarize_scores  # noqa: E402
from elign.forcefield.base import MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM  # noqa: E402
from elign.edm.evidence import Pair, paired_changes, pairs_table, values_table, verdict, verdict_table  # noqa: E402

CURVES = (("eval/force_rms_median_ev_per_angstrom", "force RMS, median (eV/Å)"),
          ("eval/force_rms_ev_per_angstrom", "force RMS, mean (eV/Å)"),
          ("eval/molecule_stability", "molecule stability"), ("eval/atom_stability", "atom stability"),
          ("eval/connected", "one-fragment share"), ("eval/validity_x_uniqueness", "validity x uniqueness"))


def parse() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None,
                   help="base checkpoint; --train starts from it (default: the --experiment recipe's model.checkpoint)")
    p.add_argument("--post", action="append", default=[],
                   help="post-trained checkpoint or run directory, one per training seed (repeat the flag)")
    p.add_argument("--train", action="store_true", help="post-train one run per --train-seeds first")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (labels with --post)")
    p.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (each model, each seed)")
    p.add_argument("--experiment", default="edm/elign", help="recipe for --train")
    p.add_argument("--runs-dir", default="outputs/evidence", help="--train writes <runs-dir>/seed<t>")
    p.add_argument("--model-config", default=str(ROOT / "conf/model/edm/base.yaml"), help="architecture YAML")
    p.add_argument("--num", type=int, default=256, help="molecules per model and sampling seed")
    p.add_argument("--num-steps", type=int, default=None, help="T (default: the model config's)")
    p.add_argument("--batch-size", type=int, default=64, help="molecules sampled at once")
    p.add_argument("--workers", type=int, default=2, help="xTB worker processes")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--min-distance", type=float, default=MIN_DISTANCE_ANGSTROM,
                   help="atoms closer than this (Å) make a molecule an xTB failure (0 = off, as before the limits existed)")
    p.add_argument("--max-force", type=float, default=MAX_FORCE_EV_PER_ANGSTROM,
                   help="an atomic force above this (eV/Å) makes a molecule an xTB failure (0 = no limit)")
    p.add_argument("--out-dir", default="outputs/evidence", help="where the tables, JSON and plots go")
    p.add_argument("--cache-dir", default=None,
                   help="cached evaluations (default <out-dir>/evals; share one across benches to sample the base once)")
    a, overrides = p.parse_known_args()
    if not a.train and len(a.post) != len(a.train_seeds):
        p.error(f"give --train, or one --post per training seed ({len(a.train_seeds)} seeds: {a.train_seeds})")
    if len(set(a.train_seeds)) != len(a.train_seeds) or len(set(a.sample_seeds)) != len(a.sample_seeds):
        p.error("--train-seeds and --sample-seeds must not repeat a seed")
    if a.base is None:
        a.base = recipe_checkpoint(a.experiment)
    return a, [o for o in overrides if o != "--"]


def recipe_checkpoint(experiment: str) -> str:
    """The base model a recipe post-trains (its composed ``model.checkpoint``), so bench and recipe never disagree."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        checkpoint = compose("config", overrides=[f"experiment={experiment}"]).model.checkpoint
    if not checkpoint:
        raise SystemExit(f"experiment={experiment} sets no model.checkpoint: give --base")
    return str(checkpoint)


def train(a: argparse.Namespace, seed: int, overrides: list[str]) -> str:
    """Post-train one seed (resumes an interrupted run; a finished one resumes at its end and stops)."""
    run_dir = Path(a.runs_dir) / f"seed{seed}"
    # The run starts from --base, so the comparison is always against the weights it was trained from.
    cmd = [sys.executable, str(ROOT / "run.py"), f"experiment={a.experiment}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "trainer.resume=auto", f"model.checkpoint={a.base}", *overrides]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return str(run_dir)


def post_checkpoint(path: str) -> str:
    """A run directory's ``checkpoint_best.pth`` (chosen by its evaluator) if it has one, else latest."""
    p = Path(path)
    if not p.is_dir():
        return str(p)
    best = p / "checkpoint_best.pth"
    return str(best if best.is_file() else p / "checkpoint_latest.pth")


def evaluate(a: argparse.Namespace, label: str, checkpoint: str, seed: int, ff: Any) -> dict[str, Any]:
    """Metrics and per-molecule scores of one checkpoint's sample, cached per (checkpoint path, seed);
    a cache entry whose checkpoint file or settings changed is recomputed."""
    ckpt = Path(checkpoint)
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns] if ckpt.is_file() else None  # package: paths never change
    meta = {"checkpoint": checkpoint, "stamp": stamp, "seed": seed, "num": a.num, "num_steps": a.num_steps,
            "model_config": a.model_config, "limits": [a.min_distance, a.max_force]}
    key = hashlib.sha1(str(ckpt.resolve() if ckpt.is_file() else checkpoint).encode()).hexdigest()[:8]
    cache = Path(a.cache_dir or Path(a.out_dir) / "evals") / f"{label}_sample{seed}_{key}.pt"
    if cache.is_file():
        held = torch.load(cache, weights_only=True)
        if held["meta"] == meta:
            print(f"{label}, sampling seed {seed}: cached ({cache})", flush=True)
            return held
    policy, _ = build_policy(None, a.model_config, checkpoint, a.num_steps)
    t0 = time.perf_counter()
    samples = sample_molecules(policy, a.num, a.batch_size, seed)
    t1 = time.perf_counter()
    scores = score_samples(samples, ff, XTB_REFS)
    result = {"meta": meta, "num_steps": policy.num_steps, "metrics": summarize_scores(scores),
              "force_rms": scores["force_rms"][scores["ff_ok"]], "samples": samples}
    print(f"{label}, sampling seed {seed}: sampled {a.num} in {t1 - t0:.0f} s, scored in "
          f"{time.perf_counter() - t1:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(cache)  # atomic: a killed bench never leaves a half-written cache entry
    return result


def nan_to_null(obj: Any) -> Any:
    """NaN (a metric that could not be computed) as JSON null: the file stays standard JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def plot_force_rms(base: list[dict], posts: dict[int, list[dict]], out: Path) -> None:
    """Per-molecule force RMS (log axis), base vs each training seed, pooled over the sampling seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pooled_base = torch.cat([r["force_rms"] for r in base]).numpy()
    seeds = list(posts)
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), squeeze=False, sharey=True)
    for ax, seed in zip(axes[0], seeds):
        post = torch.cat([r["force_rms"] for r in posts[seed]]).numpy()
        both = np.concatenate([pooled_base, post])
        if both.size == 0:
            raise ValueError("no molecule was evaluated by the force field: nothing to plot")
        bins = np.geomspace(max(float(both.min()), 1e-2), max(float(both.max()), 1e-1), 40)
        for v, name in ((pooled_base, "base"), (post, f"seed {seed}")):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name}: mean {v.mean():.2f}, median {np.median(v):.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("xTB force RMS per molecule (eV/Å)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("molecules")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_curves(run_dirs: dict[int, str], out: Path) -> bool:
    """Held-out ``eval/*`` of each run against iterations trained (0 = the base); False if none logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elign.engine.metrics import parse_metrics

    runs = {s: parse_metrics(Path(d) / "metrics.jsonl") for s, d in run_dirs.items()
            if Path(d).is_dir() and (Path(d) / "metrics.jsonl").is_file()}
    if not any(key in r for rows in runs.values() for r in rows for key, _ in CURVES):
        return False
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for seed, rows in runs.items():
            pts = [(r["iteration"] + 1, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"seed {seed}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iterations trained", fontsize=8)
        ax.tick_params(labelsize=7)
    labelled = [ax for ax in axes.flat if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=7)  # one legend: the seeds are the same in every panel
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    a, overrides = parse()
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    posts = {s: train(a, s, overrides) for s in a.train_seeds} if a.train else dict(zip(a.train_seeds, a.post))
    ff = make_force_field("xtb", a.workers, a.min_distance, a.max_force or None)
    try:
        base = {s: evaluate(a, "base", a.base, s, ff) for s in a.sample_seeds}
        post = {(t, s): evaluate(a, f"seed{t}", post_checkpoint(p), s, ff) for t, p in posts.items() for s in a.sample_seeds}
    finally:
        ff.close()
    pairs = [Pair(t, s, paired_changes(base[s]["metrics"], r["metrics"])) for (t, s), r in post.items()]
    checks = verdict(pairs)
    passed = all(all(c.values()) for c in checks.values())
    num_steps = next(iter(base.values()))["num_steps"]
    header = (f"{len(a.train_seeds)} training seeds {a.train_seeds} x {len(a.sample_seeds)} sampling seeds "
              f"{a.sample_seeds}, {a.num} molecules per model and sampling seed, T = {num_steps}")
    report = "\n\n".join([
        header, "Changes per pair (post-trained vs base, same sampling seed):", pairs_table(pairs),
        "Values (base: median over sampling seeds; post-trained: median over pairs):",
        values_table(list(r["metrics"] for r in base.values()), list(r["metrics"] for r in post.values()), pairs),
        "Targets on every training seed (median over its sampling seeds) and on the aggregate (median over pairs):",
        verdict_table(pairs), f"**{'PASS' if passed else 'FAIL'}**"])
    (out_dir / "evidence.md").write_text(report + "\n")
    (out_dir / "evidence.json").write_text(json.dumps(nan_to_null({
        "meta": {"train_seeds": a.train_seeds, "sample_seeds": a.sample_seeds, "num": a.num, "num_steps": num_steps,
                 "base": a.base, "post": {str(t): post_checkpoint(p) for t, p in posts.items()},
                 "experiment": a.experiment if a.train else None, "overrides": overrides},
        "base": {str(s): r["metrics"] for s, r in base.items()},
        "post": {f"{t},{s}": r["metrics"] for (t, s), r in post.items()},
        "pairs": [{"train_seed": p.train_seed, "sample_seed": p.sample_seed, "changes": p.changes} for p in pairs],
        "checks": checks, "passed": passed}), indent=2, allow_nan=False) + "\n")
    plot_force_rms(list(base.values()), {t: [post[t, s] for s in a.sample_seeds] for t in posts}, out_dir / "force_rms.png")
    curves = plot_curves({t: p for t, p in posts.items()}, out_dir / "curves.png")
    print(report)
    print(f"wrote {out_dir / 'evidence.md'}, evidence.json, force_rms.png" + (", curves.png" if curves else ""))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
