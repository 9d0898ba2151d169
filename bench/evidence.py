"""Base vs post-trained EDM on the same fixed-seed samples: does FED-GRPO move the physics?

    python bench/evidence.py --train                      # post-train (experiment=edm/elign_evidence), then compare
    python bench/evidence.py --post outputs/evidence      # a run's best checkpoint (else latest)
    python bench/evidence.py --post outputs/evidence/checkpoint_latest.pth   # a given checkpoint
    python bench/evidence.py --post RUN --num 512 --seed 1 -- <extra run.py overrides for --train>

Both models draw the same node counts and the same initial noise (one seed), so the comparison is
paired. Every molecule is scored as sampled (never repaired): stability and RDKit validity /
uniqueness with the project's bond inference, and GFN2-xTB force RMS and formation energy per atom.
Writes ``evidence.json``, ``evidence.md`` (the README table) and ``force_rms.png`` to --out-dir and
prints the table with the issue's targets (force RMS -20 %, stability >= -2 points, V x U >= -5 points).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elign.edm.cli import XTB_REFS, build_policy, make_force_field  # noqa: E402
from elign.edm.evaluate import sample_molecules, score_samples, summarize_scores  # noqa: E402

BASE = "package:elign/edm/weights/edm_base.pth"
ROWS = [("molecule_stability", "molecule stability", 100.0, "%"), ("atom_stability", "atom stability", 100.0, "%"),
        ("validity", "RDKit validity", 100.0, "%"), ("uniqueness", "uniqueness", 100.0, "%"),
        ("validity_x_uniqueness", "validity x uniqueness", 100.0, "%"),
        ("connected", "one fragment (validity is of the largest)", 100.0, "%"),
        ("fragments_per_molecule", "fragments per molecule", 1.0, ""),
        ("force_rms_ev_per_angstrom", "xTB force RMS, mean (eV/Å)", 1.0, ""),
        ("force_rms_median_ev_per_angstrom", "xTB force RMS, median (eV/Å)", 1.0, ""),
        ("force_rms_stable_ev_per_angstrom", "xTB force RMS, stable molecules (eV/Å)", 1.0, ""),
        ("energy_per_atom_ev", "xTB formation energy per atom (eV)", 1.0, ""),
        ("ff_failed_frac", "xTB failures", 100.0, "%")]


def parse() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help="base checkpoint (default: the shipped base model)")
    p.add_argument("--post", help="post-trained checkpoint or run directory")
    p.add_argument("--train", action="store_true", help="run the post-training recipe first")
    p.add_argument("--experiment", default="edm/elign_evidence", help="recipe for --train")
    p.add_argument("--run-dir", default="outputs/evidence", help="run directory for --train")
    p.add_argument("--model-config", default=str(ROOT / "conf/model/edm/base.yaml"), help="architecture YAML")
    p.add_argument("--num", type=int, default=256, help="molecules per model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for both models)")
    p.add_argument("--num-steps", type=int, default=None, help="T (default: the model config's)")
    p.add_argument("--batch-size", type=int, default=64, help="molecules sampled at once")
    p.add_argument("--workers", type=int, default=2, help="xTB worker processes")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out-dir", default="outputs/evidence", help="where the table, JSON and plot go")
    return p.parse_known_args()


def post_checkpoint(path: str) -> str:
    """A run directory's ``checkpoint_best.pth`` (chosen by its evaluator) if it has one, else latest."""
    p = Path(path)
    if not p.is_dir():
        return str(p)
    best = p / "checkpoint_best.pth"
    return str(best if best.is_file() else p / "checkpoint_latest.pth")


def evaluate_model(label: str, a: argparse.Namespace, checkpoint: str, ff: Any) -> tuple[dict, dict, int]:
    """Metrics, per-molecule scores and T of one checkpoint's fixed-seed sample."""
    policy, _ = build_policy(None, a.model_config, checkpoint, a.num_steps)
    t0 = time.perf_counter()
    samples = sample_molecules(policy, a.num, a.batch_size, a.seed)
    t1 = time.perf_counter()
    scores = score_samples(samples, ff, XTB_REFS)
    metrics = summarize_scores(scores)
    print(f"{label}: sampled {a.num} in {t1 - t0:.0f} s, scored in {time.perf_counter() - t1:.0f} s", flush=True)
    torch.save(samples, Path(a.out_dir) / f"samples_{label}.pt")
    return metrics, scores, policy.num_steps


def table(base: dict, post: dict, meta: dict) -> tuple[str, dict[str, bool]]:
    lines = [f"| metric ({meta['num']} samples, seed {meta['seed']}, T = {meta['num_steps']}) | base | post-trained | change |",
             "|---|---:|---:|---:|"]
    for key, name, scale, unit in ROWS:
        if key not in base or key not in post:
            continue
        b, p = base[key] * scale, post[key] * scale
        change = f"{p - b:+.1f} pts" if unit == "%" else f"{100 * (p - b) / abs(b):+.1f} %"
        fmt = ".1f" if unit == "%" else ".3f"
        lines.append(f"| {name} | {b:{fmt}}{unit} | {p:{fmt}}{unit} | {change} |")
    checks = {
        "force RMS drops by >= 20 %": post["force_rms_ev_per_angstrom"] <= 0.8 * base["force_rms_ev_per_angstrom"],
        "molecule stability falls by <= 2 points": post["molecule_stability"] >= base["molecule_stability"] - 0.02,
        "validity x uniqueness falls by <= 5 points": post["validity_x_uniqueness"] >= base["validity_x_uniqueness"] - 0.05,
    }
    return "\n".join(lines), checks


def plot(base: dict, post: dict, out: Path) -> None:
    """Per-molecule force RMS of both models on a log axis (a few exploded samples reach 100s of eV/Å)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [s["force_rms"][s["ff_ok"]].numpy() for s in (base, post)]
    pooled = np.concatenate(values)
    if pooled.size == 0:
        raise ValueError("no molecule was evaluated by the force field: nothing to plot")
    bins = np.geomspace(max(float(pooled.min()), 1e-2), max(float(pooled.max()), 1e-1), 40)
    for v, label in zip(values, ("base", "post-trained")):
        ax.hist(v, bins=bins, alpha=0.55, label=f"{label} (mean {v.mean():.2f}, median {np.median(v):.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("xTB force RMS per molecule (eV/Å, log scale)")
    ax.set_ylabel("molecules")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    a, overrides = parse()
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.train:
        cmd = [sys.executable, str(ROOT / "run.py"), f"experiment={a.experiment}", f"hydra.run.dir={a.run_dir}",
               *[o for o in overrides if o != "--"]]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        a.post = a.run_dir
    if a.post is None:
        raise SystemExit("give --post CHECKPOINT_OR_RUN_DIR, or --train")
    post_ckpt = post_checkpoint(a.post)
    ff = make_force_field("xtb", a.workers)
    try:
        base_m, base_s, num_steps = evaluate_model("base", a, a.base, ff)
        post_m, post_s, _ = evaluate_model("post", a, post_ckpt, ff)
    finally:
        ff.close()
    meta = {"num": a.num, "seed": a.seed, "num_steps": num_steps, "base": a.base, "post": post_ckpt}
    text, checks = table(base_m, post_m, meta)
    report = text + "\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items())
    (out_dir / "evidence.md").write_text(report + "\n")
    (out_dir / "evidence.json").write_text(json.dumps({"meta": meta, "base": base_m, "post": post_m,
                                                      "checks": checks}, indent=2) + "\n")
    plot(base_s, post_s, out_dir / "force_rms.png")
    print(report)
    print(f"wrote {out_dir / 'evidence.md'}, evidence.json and force_rms.png")


if __name__ == "__main__":
    main()
