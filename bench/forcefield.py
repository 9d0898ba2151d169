"""Throughput of the force-field backends on QM9-size molecules (molecules per second).

    .venv/bin/python bench/forcefield.py                       # all backends, 256 molecules
    .venv/bin/python bench/forcefield.py --num-molecules 64 --backends xtb-w1 xtb-w2

Molecules: ``--num-molecules`` SMILES drawn with ``--seed`` from the shared QM9 list, embedded
with RDKit ETKDG (same seed) and perturbed with Gaussian noise of ``--noise`` Å, as a generative
model's samples would be. Every backend gets the same padded batch.

Timing: each backend is built and called once on the first few molecules (worker start-up,
fairchem's lazy initialisation) before the timed call on the whole batch, so the table shows
steady-state throughput. UMA uses random-weight checkpoints built here (the real weights are
gated): "tiny" (tests) and "small" (UMA-S sized, ~150 M parameters); throughput does not depend
on the weights' values. ``uma-*-ase`` is the per-molecule loop with fairchem's ASE calculator
(``FAIRChemCalculator``, same predictor), the usual way UMA is called, for comparison; it is
timed on the first ``--ase-molecules`` molecules (molecules/s is a rate, so the subset does not
bias it).

Backends: xtb-w1, xtb-w2 (GFN2-xTB with 1 = in-process / 2 worker processes), mmff-w1, mmff-w2,
uma-tiny, uma-tiny-ase, uma-small, uma-small-ase.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
QM9_SMILES = Path("/work/shared/data/qm9_smiles.txt")
ALL_BACKENDS = ("xtb-w1", "xtb-w2", "mmff-w1", "mmff-w2", "uma-tiny", "uma-tiny-ase", "uma-small", "uma-small-ase")
XTB_SETTINGS = dict(method="GFN2-xTB", accuracy=1.0, max_iterations=250, electronic_temperature=300.0)


def build_molecules(num: int, seed: int, noise: float, smiles_file: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num`` noisy ETKDG geometries ``(Z [n], R [n, 3] Å)`` of seeded random QM9 SMILES."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    smiles = smiles_file.read_text().split()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    out = []
    for smi in rng.sample(smiles, min(len(smiles), 4 * num)):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        params = AllChem.ETKDGv3()
        params.randomSeed = seed
        params.maxIterations = 200
        if AllChem.EmbedMolecule(mol, params) != 0:
            continue  # a few strained QM9 cages do not embed; take the next SMILES
        pos = mol.GetConformer().GetPositions()
        out.append((np.array([a.GetAtomicNum() for a in mol.GetAtoms()]), pos + noise_rng.normal(scale=noise, size=pos.shape)))
        if len(out) == num:
            return out
    raise RuntimeError(f"could embed only {len(out)} of {num} molecules")


def pad(molecules: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(z) for z, _ in molecules)
    pos = torch.zeros(len(molecules), n, 3, dtype=torch.float64)
    z = torch.zeros(len(molecules), n, dtype=torch.long)
    mask = torch.zeros(len(molecules), n, dtype=torch.bool)
    for i, (numbers, coords) in enumerate(molecules):
        pos[i, : len(numbers)] = torch.as_tensor(coords)
        z[i, : len(numbers)] = torch.as_tensor(numbers)
        mask[i, : len(numbers)] = True
    return pos, z, mask


def time_force_field(ff: Any, batch: tuple[torch.Tensor, ...], warmup: int) -> tuple[float, int]:
    """Seconds for one call on the whole batch (after a warm-up call) and the number ok."""
    ff(*(t[:warmup] for t in batch))
    start = time.perf_counter()
    res = ff(*batch)
    return time.perf_counter() - start, int(res.ok.sum())


def time_ase_loop(uma_ff: Any, molecules: list[tuple[np.ndarray, np.ndarray]], warmup: int) -> tuple[float, int]:
    """Seconds for a per-molecule loop with fairchem's ASE calculator (same predictor)."""
    from ase import Atoms
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    calc = FAIRChemCalculator(uma_ff.predictor, task_name="omol")

    def run(mols: list) -> int:
        done = 0
        for numbers, coords in mols:
            atoms = Atoms(numbers=numbers, positions=coords, pbc=False)
            atoms.info.update(charge=0, spin=1)
            atoms.calc = calc
            atoms.get_potential_energy()
            atoms.get_forces()
            done += 1
        return done

    run(molecules[:warmup])
    start = time.perf_counter()
    done = run(molecules)
    return time.perf_counter() - start, done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-molecules", type=int, default=256, help="molecules in the batch")
    parser.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the SMILES draw, ETKDG and noise")
    parser.add_argument("--noise", type=float, default=0.05, help="Gaussian noise on coordinates, Å")
    parser.add_argument("--uma-batch-size", type=int, default=16, help="molecules per UMA predict call")
    parser.add_argument("--uma-inference-settings", default="batch", help="fairchem preset for the UMA rows")
    parser.add_argument("--ase-molecules", type=int, default=64, help="molecules timed in the ASE loops")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="where to build/reuse UMA checkpoints (default: a temp dir)")
    parser.add_argument("--smiles", type=Path, default=QM9_SMILES, help="SMILES file, one per line")
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch.set_num_threads for the UMA rows (default: torch's own choice). On a machine "
        "whose cores are busy with other jobs, more OpenMP threads than free cores is much slower",
    )
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    sys.path.insert(0, str(ROOT))
    from elign.forcefield.mmff import MMFFForceField
    from elign.forcefield.xtb import XTBForceField

    t0 = time.perf_counter()
    molecules = build_molecules(args.num_molecules, args.seed, args.noise, args.smiles)
    batch = pad(molecules)
    sizes = [len(z) for z, _ in molecules]
    print(
        f"{len(molecules)} QM9 molecules, {min(sizes)}-{max(sizes)} atoms (mean {np.mean(sizes):.1f}), "
        f"noise {args.noise} Å, built in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
        f"CPUs {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(f"UMA rows: batch_size {args.uma_batch_size}, inference_settings {args.uma_inference_settings!r}", flush=True)
    warmup = 8
    tmp = tempfile.TemporaryDirectory(prefix="ff_bench_")
    ckpt_dir = args.checkpoint_dir or Path(tmp.name)
    uma_cache: dict[str, Any] = {}

    def uma(size: str) -> Any:
        if size not in uma_cache:
            from elign.forcefield.uma import UMAForceField
            from elign.forcefield.uma_tiny import build_random_uma_checkpoint

            path = ckpt_dir / f"uma_random_{size}.pt"
            if not path.is_file():
                t = time.perf_counter()
                build_random_uma_checkpoint(path, size=size, seed=args.seed)
                print(f"built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s", flush=True)
            uma_cache[size] = UMAForceField(
                model=str(path), batch_size=args.uma_batch_size, inference_settings=args.uma_inference_settings, device="cpu"
            )
        return uma_cache[size]

    runners: dict[str, Callable[[], tuple[float, int, int]]] = {}

    def with_ff(make: Callable[[], Any]) -> Callable[[], tuple[float, int, int]]:
        def run() -> tuple[float, int, int]:
            with make() as ff:
                seconds, ok = time_force_field(ff, batch, warmup)
            return seconds, ok, len(molecules)

        return run

    def ase_loop(size: str) -> Callable[[], tuple[float, int, int]]:
        def run() -> tuple[float, int, int]:
            subset = molecules[: args.ase_molecules]
            seconds, done = time_ase_loop(uma(size), subset, warmup=2)
            return seconds, done, len(subset)

        return run

    runners["xtb-w1"] = with_ff(lambda: XTBForceField(num_workers=1, **XTB_SETTINGS))
    runners["xtb-w2"] = with_ff(lambda: XTBForceField(num_workers=2, **XTB_SETTINGS))
    runners["mmff-w1"] = with_ff(lambda: MMFFForceField(num_workers=1))
    runners["mmff-w2"] = with_ff(lambda: MMFFForceField(num_workers=2))
    runners["uma-tiny"] = lambda: (*time_force_field(uma("tiny"), batch, warmup), len(molecules))
    runners["uma-tiny-ase"] = ase_loop("tiny")
    runners["uma-small"] = lambda: (*time_force_field(uma("small"), batch, warmup), len(molecules))
    runners["uma-small-ase"] = ase_loop("small")

    rates: dict[str, float] = {}
    print(f"\n{'backend':<15} {'molecules':>9} {'ok':>5} {'seconds':>9} {'molecules/s':>12}", flush=True)
    for name in args.backends:
        seconds, ok, n = runners[name]()
        rates[name] = n / seconds
        print(f"{name:<15} {n:>9} {ok:>5} {seconds:>9.2f} {rates[name]:>12.1f}", flush=True)

    print()
    for fast, slow, target in [("xtb-w2", "xtb-w1", 1.8), ("uma-tiny", "uma-tiny-ase", 5.0), ("uma-small", "uma-small-ase", 5.0)]:
        if fast in rates and slow in rates:
            ratio = rates[fast] / rates[slow]
            print(f"{fast} / {slow}: {ratio:.2f}x (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    tmp.cleanup()


if __name__ == "__main__":  # required: worker processes are started with "spawn"
    main()
