"""Sample, evaluate and report on EDM checkpoints.

    python -m elign.edm.cli sample   --run-dir RUN [--checkpoint PATH] --num 256 --seed 0 --out samples.pt
    python -m elign.edm.cli sample   --model-config conf/model/edm/small.yaml --checkpoint base.pth --out samples.pt
    python -m elign.edm.cli evaluate --samples samples.pt --force-field xtb [--reference smiles.txt] --out eval.json
    python -m elign.edm.cli report   RUN [--samples samples.pt]       # curves.png and molecules.png in RUN
    python -m elign.edm.cli export   --checkpoint RUN/checkpoint_best.pth --out base.pth   # weights only

Samples are saved as tensors (positions Å, atomic numbers, node mask) with the seed and the
checkpoint they came from, and load with ``torch.load(weights_only=True)``. A missing or unreadable
input file ends the command with exit code 2 and one line naming the file.
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

from elign.edm.evaluate import evaluate_samples, sample_molecules
from elign.engine.checkpoint import BEST, LATEST
from elign.engine.errors import ConfigError, DataFormatError
from elign.engine.memory import configure_host_allocator
from elign.forcefield.base import MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM

XTB_REFS = {1: -10.707211, 6: -48.798080, 7: -70.908087, 8: -102.521807, 9: -125.698643}
SAMPLE_KEYS = ("positions", "atomic_numbers", "node_mask")


def load_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a missing or unreadable file is a
    :class:`DataFormatError` naming it (``what`` says what it should have been)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, f"no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - empty, truncated, random bytes, pickled objects: all unreadable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataFormatError(str(path), None, f"not a readable {what} ({first})") from None


def load_samples(path: str | Path) -> dict[str, torch.Tensor]:
    """A file written by ``sample``: ``positions [S, N, 3]``, ``atomic_numbers [S, N]``,
    ``node_mask [S, N]``; anything else is a :class:`DataFormatError` naming the file."""
    samples = load_file(path, "samples file (written by `sample`)")
    if not isinstance(samples, dict) or not all(isinstance(samples.get(k), torch.Tensor) for k in SAMPLE_KEYS):
        raise DataFormatError(str(path), None, f"not a samples file: needs tensors {', '.join(SAMPLE_KEYS)}")
    pos, z, mask = (samples[k] for k in SAMPLE_KEYS)
    if pos.ndim != 3 or pos.shape[-1] != 3 or z.shape != pos.shape[:2] or mask.shape != pos.shape[:2]:
        raise DataFormatError(str(path), None, f"inconsistent shapes: positions {tuple(pos.shape)}, atomic_numbers "
                                               f"{tuple(z.shape)}, node_mask {tuple(mask.shape)}")
    return samples


def build_policy(run_dir: str | None, model_config: str | None, checkpoint: str | None, num_steps: int | None) -> Any:
    """The EDM policy of a run directory (its ``config.yaml``) or of a model YAML, with weights."""
    if run_dir is not None:
        if not (Path(run_dir) / "config.yaml").is_file():
            raise DataFormatError(str(Path(run_dir) / "config.yaml"), None, "no such file: not a run directory")
        cfg = OmegaConf.load(Path(run_dir) / "config.yaml").model
        if checkpoint is None:
            best, latest = Path(run_dir) / BEST, Path(run_dir) / LATEST
            checkpoint = str(best if best.is_file() else latest)
    elif model_config is not None:
        cfg = OmegaConf.load(model_config)
        if checkpoint is None:
            checkpoint = cfg.get("checkpoint")  # e.g. the shipped weights of conf/model/edm/base.yaml
    else:
        raise SystemExit("give --run-dir or --model-config")
    if checkpoint is None:
        raise SystemExit("give --checkpoint (no run directory to find one in, and the model config names none)")
    cfg.checkpoint = str(checkpoint)
    if num_steps is not None:
        cfg.num_steps = num_steps
    try:
        return instantiate(cfg), checkpoint
    except Exception as exc:  # a ConfigError of the model (e.g. an unreadable checkpoint) arrives wrapped by Hydra
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def cmd_sample(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    configure_host_allocator("retain")  # as run.py: sampling reuses warm pages for its edge tensors
    policy, checkpoint = build_policy(a.run_dir, a.model_config, a.checkpoint, a.num_steps)
    samples = sample_molecules(policy, a.num, a.batch_size, a.seed)
    samples.update(seed=a.seed, checkpoint=str(checkpoint), num_steps=policy.num_steps)
    torch.save(samples, a.out)
    print(f"wrote {a.num} molecules to {a.out}")


def make_force_field(name: str, workers: int, min_distance: float = MIN_DISTANCE_ANGSTROM,
                     max_force: float | None = MAX_FORCE_EV_PER_ANGSTROM) -> Any:
    limits = {"min_distance_angstrom": min_distance, "max_force_ev_per_angstrom": max_force}
    if name == "none":
        return None
    if name == "xtb":
        from elign.forcefield.xtb import XTBForceField
        return XTBForceField(num_workers=workers, accuracy=1.0, max_iterations=250, electronic_temperature=300.0,
                             **limits)
    if name == "mmff":
        from elign.forcefield.mmff import MMFFForceField
        return MMFFForceField(num_workers=workers, **limits)
    raise SystemExit(f"--force-field must be xtb, mmff or none, got {name!r}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    samples = load_samples(a.samples)
    reference = None
    if a.reference:
        from elign.chem.metrics import load_reference_smiles
        if not Path(a.reference).is_file():
            raise DataFormatError(a.reference, None, "no such SMILES file (--reference)")
        reference = load_reference_smiles(a.reference)
    max_force = None if a.max_force <= 0 else a.max_force
    ff = make_force_field(a.force_field, a.workers, a.min_distance, max_force)
    try:
        metrics = evaluate_samples(samples, ff, reference, XTB_REFS if a.force_field == "xtb" else None)
    finally:
        if ff is not None and hasattr(ff, "close"):
            ff.close()
    metrics.update(samples=str(a.samples), force_field=a.force_field, checkpoint=samples.get("checkpoint"))
    text = json.dumps(metrics, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


def draw_molecules(samples: dict, out: Path, count: int = 24, per_row: int = 6) -> Path:
    """RDKit depictions of the first ``count`` samples, titled with their SMILES (or "invalid")."""
    from rdkit import Chem
    from rdkit.Chem import Draw, rdDepictor

    from elign.chem.rdkit_mol import build_molecule, to_smiles

    mols, legends = [], []
    for i in range(min(count, samples["positions"].shape[0])):
        m = samples["node_mask"][i].bool()
        mol = build_molecule(samples["positions"][i][m].double().numpy(), samples["atomic_numbers"][i][m].numpy())
        smiles = to_smiles(Chem.Mol(mol))
        try:
            shown = Chem.RemoveHs(mol, sanitize=smiles is not None)
        except Exception:  # an unsanitisable graph is drawn as it is
            shown = mol
        shown.RemoveAllConformers()
        rdDepictor.Compute2DCoords(shown)
        mols.append(shown)
        legends.append(smiles if smiles is not None and len(smiles) < 30 else ("invalid" if smiles is None else smiles[:27] + "..."))
    image = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(220, 180), legends=legends)
    image.save(out)
    return out


def cmd_report(a: argparse.Namespace) -> None:
    from elign.engine.report import plot_curves

    run = Path(a.run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise DataFormatError(str(run / "metrics.jsonl"), None, "no such file: not a run directory")
    print(f"wrote {plot_curves(run)}")
    if a.samples:
        print(f"wrote {draw_molecules(load_samples(a.samples), run / 'molecules.png')}")


def cmd_export(a: argparse.Namespace) -> None:
    from elign.edm.policy import extract_dynamics_state, resolve_package_path
    from elign.engine.checkpoint import atomic_save

    try:
        state = extract_dynamics_state(load_file(resolve_package_path(a.checkpoint), "checkpoint (--checkpoint)"))
    except ValueError as exc:  # extract_dynamics_state: not a state dict
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(a.checkpoint, None, str(exc)) from None
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}  # own storages: the file holds these tensors only
    atomic_save(state, Path(a.out))
    size = sum(v.numel() * v.element_size() for v in state.values())
    print(f"wrote {len(state)} tensors ({size / 2**20:.1f} MiB) to {a.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m elign.edm.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample molecules from a checkpoint")
    s.add_argument("--run-dir", help="run directory (config.yaml + checkpoints)")
    s.add_argument("--model-config", help="model YAML (conf/model/edm/*.yaml) when there is no run directory")
    s.add_argument("--checkpoint", help="weights (default: the run's best, else latest checkpoint)")
    s.add_argument("--num", type=int, default=256, help="molecules")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-size", type=int, default=64, help="molecules sampled at once")
    s.add_argument("--num-steps", type=int, default=None, help="T (default: the model config's)")
    s.add_argument("--threads", type=int, default=2, help="torch threads")
    s.add_argument("--out", required=True, help="output .pt file")
    e = sub.add_parser("evaluate", help="chemistry and physics metrics of saved samples")
    e.add_argument("--samples", required=True, help="file written by `sample`")
    e.add_argument("--force-field", default="xtb", help="xtb | mmff | none")
    e.add_argument("--workers", type=int, default=2, help="force-field worker processes")
    e.add_argument("--reference", help="SMILES file (training set) for novelty")
    e.add_argument("--min-distance", type=float, default=MIN_DISTANCE_ANGSTROM,
                   help="atoms closer than this (Å) make a molecule a force-field failure; 0 = off")
    e.add_argument("--max-force", type=float, default=MAX_FORCE_EV_PER_ANGSTROM,
                   help="an atomic force above this (eV/Å) makes a molecule a force-field failure; 0 = no limit")
    e.add_argument("--out", help="JSON output file")
    r = sub.add_parser("report", help="PNG curves of a run (and a grid of sampled molecules)")
    r.add_argument("run_dir", help="run directory")
    r.add_argument("--samples", help="samples file to draw")
    x = sub.add_parser("export", help="dynamics weights only (the EMA ones if present) from a checkpoint")
    x.add_argument("--checkpoint", required=True, help="trainer checkpoint or state dict")
    x.add_argument("--out", required=True, help="output .pth (a plain state dict)")
    a = p.parse_args(argv)
    try:
        {"sample": cmd_sample, "evaluate": cmd_evaluate, "report": cmd_report, "export": cmd_export}[a.command](a)
    except (ConfigError, DataFormatError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
