"""Predict, report and export for Boltz-2 SFT runs, like the other domains' CLIs.

    python -m boltz_ft.cli predict --run-dir RUN STRUCTURE.pdb [--samples 5 --steps 200] --out-dir DIR
    python -m boltz_ft.cli report  --run-dir RUN                  # curves.png + the acceptance verdict
    python -m boltz_ft.cli export  --run-dir RUN --out merged.ckpt  # adapters merged into the base weights

``predict`` samples structures of a PDB / mmCIF file with the run's model (its ``config.yaml`` and best or
latest checkpoint), writes them as mmCIF and PDB with pLDDT in the B-factor column when the model has a
confidence head, and prints Cα-lDDT / RMSD / TM-score / clash fraction against the file's own
coordinates. ``export`` writes a Lightning-layout checkpoint that ``boltz_ft.backend.load_boltz2`` reads
without unpickling code. A missing or unreadable input exits with code 2 and one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from elign.engine.checkpoint import BEST, LATEST
from elign.engine.errors import ConfigError, DataFormatError


def build_policy(run_dir: str, checkpoint: str | None = None) -> Any:
    """The policy of a run directory (its ``config.yaml``), with its best (else latest) checkpoint."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise DataFormatError(str(config), None, "no such file: not a run directory")
    cfg = OmegaConf.load(config)
    if checkpoint is None:
        best, latest = Path(run_dir) / BEST, Path(run_dir) / LATEST
        checkpoint = str(best if best.is_file() else latest)
    if not Path(checkpoint).is_file():
        raise DataFormatError(str(checkpoint), None, "no such checkpoint")
    cfg.model.checkpoint = checkpoint
    return instantiate(cfg.model)


def cmd_predict(a: argparse.Namespace) -> None:
    from boltz_ft.ccd import CCDMolecules
    from boltz_ft.data import featurize, load_structure, split_batch
    from boltz_ft.metrics import structure_metrics
    from boltz_ft.writer import write_features

    policy = build_policy(a.run_dir, a.checkpoint)
    mols = CCDMolecules()
    target = load_structure(a.structure, mols)
    feats = featurize(target, mols, seed=a.seed, max_tokens=a.max_tokens, training=False)
    batch = split_batch(feats, {"pdb_id": target.id})
    torch.manual_seed(a.seed)
    confidence = bool(getattr(policy.model, "confidence_prediction", False))
    out = policy.predict(batch, a.samples, a.steps, a.recycling_steps, confidence=confidence)
    scores = structure_metrics(out["coords"], {**batch["inputs"], **batch["targets"]})
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(out["coords"].shape[0]):
        plddt = out["plddt"][k] if "plddt" in out else None
        for fmt in ("cif", "pdb"):
            write_features(feats, out["coords"][k], out_dir / f"{target.id}_sample{k}.{fmt}", fmt, plddt=plddt)
    summary = {key: [round(float(v), 4) for v in values] for key, values in scores.items()}
    (out_dir / f"{target.id}_scores.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


def cmd_report(a: argparse.Namespace) -> None:
    from elign.engine.report import plot_curves

    run = Path(a.run_dir)
    keys = None if a.keys is None else a.keys.split(",")
    print(f"wrote {plot_curves(run, run / 'curves.png', keys=keys)}")
    verdict = run / "acceptance.json"
    if verdict.is_file():
        data = json.loads(verdict.read_text())
        print("acceptance " + ("PASS" if data["passed"] else "FAIL") + ": "
              + "; ".join(f"{k} {v['value']} ({'pass' if v['passed'] else 'fail'})" for k, v in data["checks"].items()))


def cmd_export(a: argparse.Namespace) -> None:
    policy = build_policy(a.run_dir, a.checkpoint)
    print(f"wrote {policy.export(a.out)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m boltz_ft.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="sample structures of a PDB / mmCIF file with a run's model")
    p.add_argument("structure", help="PDB or mmCIF file (its coordinates are the truth the scores use)")
    p.add_argument("--samples", type=int, default=5, help="structures sampled (boltz predict: 1-5)")
    p.add_argument("--steps", type=int, default=200, help="sampler steps (boltz predict: 200)")
    p.add_argument("--recycling-steps", type=int, default=3, help="trunk recycling passes (boltz predict: 3)")
    p.add_argument("--max-tokens", type=int, default=None, help="crop to this many tokens (default: whole)")
    p.add_argument("--out-dir", default="predictions", help="folder for the mmCIF / PDB files and scores")
    r = sub.add_parser("report", help="training curves and the acceptance verdict of a run")
    r.add_argument("--keys", default=None, help="comma-separated metrics to plot (default: losses and eval)")
    x = sub.add_parser("export", help="a Lightning-layout checkpoint with the adapters merged")
    x.add_argument("--out", required=True, help="output checkpoint path")
    for s in (p, r, x):
        s.add_argument("--run-dir", required=True, help="run directory (config.yaml, checkpoints)")
    for s in (p, x):
        s.add_argument("--checkpoint", default=None, help="checkpoint (default: the run's best, else latest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop and the sampling noise")
    a = parser.parse_args(argv)
    try:
        {"predict": cmd_predict, "report": cmd_report, "export": cmd_export}[a.command](a)
    except (DataFormatError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
