"""3D geometries from SMILES: RDKit ETKDG embedding, MMFF pre-relaxation, optional GFN2-xTB relaxation.

Used by the chemistry tests and meant for building the embedded QM9 sample (spec §3, data README): QM9
SMILES -> all-atom geometry good enough that EDM bond inference recovers the molecule.

Measured on a 2-core machine (1 OpenMP thread, QM9 molecules of ~17 atoms incl. H): ETKDG ~50 ms,
MMFF ~3 ms, GFN2-xTB L-BFGS to fmax 0.05 eV/Å ~0.2 s (mean 25 steps, max ~120) per molecule;
ETKDG fails within 3 seeds for ~4 % of QM9 lines (strained cages with fixed stereo), ~1-2 s each.

Threads: tblite parallelises with OpenMP; for molecules this small the threads mostly wait on each
other, and on a loaded machine 2 threads ran ~6x *slower* than 1. Use :func:`embed_many`, which runs
workers in fresh processes with ``OMP_NUM_THREADS=1`` (the variable only counts before the OpenMP
runtime starts, so it cannot be changed inside an already-running process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Literal

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem

__all__ = ["EmbeddedMolecule", "EmbeddingError", "embed_many", "embed_smiles", "relax_xtb"]

Relax = Literal["xtb", "mmff", "none"]


class EmbeddingError(RuntimeError):
    """ETKDG found no conformer (happens for a few strained QM9 polycycles with fixed stereo)."""


@dataclass(frozen=True)
class EmbeddedMolecule:
    """An all-atom geometry.

    Attributes:
        smiles: input SMILES.
        symbols: ``N`` element symbols (hydrogens included, RDKit ``AddHs`` order: heavy atoms first).
        positions: ``[N, 3]`` float64 coordinates in Å.
        relax: which relaxation produced ``positions``.
        xtb_steps: optimiser steps taken by the xTB relaxation (0 if not run).
    """

    smiles: str
    symbols: tuple[str, ...]
    positions: np.ndarray
    relax: str
    xtb_steps: int = 0


def relax_xtb(
    symbols: tuple[str, ...] | list[str], positions: np.ndarray, fmax: float = 0.05, max_steps: int = 200
) -> tuple[np.ndarray, int]:
    """Relax a neutral closed-shell geometry with GFN2-xTB (tblite) and ASE's L-BFGS.

    Args:
        symbols: ``N`` element symbols; positions: ``[N, 3]`` Å.
        fmax: force convergence threshold in eV/Å; max_steps: optimiser step cap.

    Returns:
        ``(positions [N, 3] Å, steps taken)``.
    """
    # Imported lazily: tblite/ASE are the optional "chem" extra and loading tblite starts OpenMP.
    from ase import Atoms
    from ase.optimize import LBFGS
    from tblite.ase import TBLite

    atoms = Atoms(list(symbols), positions=np.asarray(positions, dtype=np.float64))
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    opt = LBFGS(atoms, logfile=None)
    opt.run(fmax=fmax, steps=max_steps)
    return atoms.get_positions().copy(), int(opt.nsteps)


def embed_smiles(
    smiles: str,
    seed: int = 0,
    relax: Relax = "xtb",
    max_embed_attempts: int = 3,
    xtb_fmax: float = 0.05,
) -> EmbeddedMolecule:
    """Embed a SMILES in 3D with explicit hydrogens.

    ETKDGv3 with random initial coordinates (the default eigenvector start fails for many strained QM9
    cages); up to ``max_embed_attempts`` seeds ``seed, seed+1, ...`` are tried, then
    :class:`EmbeddingError`. Chirality from the SMILES is enforced. MMFF94 always pre-relaxes (cheap and
    it removes ETKDG's distorted bond lengths) unless ``relax="none"``; ``relax="xtb"`` then refines with
    GFN2-xTB to ``xtb_fmax`` eV/Å.
    """
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise ValueError(f"cannot parse SMILES {smiles!r}")
        mol = Chem.AddHs(mol)
        for attempt in range(max_embed_attempts):
            params = AllChem.ETKDGv3()
            params.randomSeed = seed + attempt
            params.useRandomCoords = True
            if AllChem.EmbedMolecule(mol, params) == 0:
                break
        else:
            raise EmbeddingError(f"ETKDG failed for {smiles!r} after {max_embed_attempts} seeds")
        if relax != "none" and AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    symbols = tuple(a.GetSymbol() for a in mol.GetAtoms())
    pos = mol.GetConformer().GetPositions().astype(np.float64)
    steps = 0
    if relax == "xtb":
        pos, steps = relax_xtb(symbols, pos, fmax=xtb_fmax)
    return EmbeddedMolecule(smiles=smiles, symbols=symbols, positions=pos, relax=relax, xtb_steps=steps)


def _init_worker(omp_threads: int) -> None:
    # Runs in the fresh (spawned) worker before tblite is imported, so OpenMP picks it up.
    os.environ["OMP_NUM_THREADS"] = str(omp_threads)


def _embed_or_none(args: tuple[str, int, Relax, int, float]) -> EmbeddedMolecule | None:
    smiles, seed, relax, attempts, fmax = args
    try:
        return embed_smiles(smiles, seed=seed, relax=relax, max_embed_attempts=attempts, xtb_fmax=fmax)
    except EmbeddingError:
        return None


def embed_many(
    smiles: Sequence[str],
    seed: int = 0,
    relax: Relax = "xtb",
    workers: int = 1,
    omp_threads: int = 1,
    max_embed_attempts: int = 3,
    xtb_fmax: float = 0.05,
) -> list[EmbeddedMolecule | None]:
    """:func:`embed_smiles` over many SMILES in ``workers`` spawned processes (order preserved).

    Entries are ``None`` where ETKDG failed (:class:`EmbeddingError`); other errors propagate. Every
    molecule uses the same ``seed``, so results do not depend on ``workers``. Workers are *spawned*, so
    a script calling this must do so under ``if __name__ == "__main__":``.
    """
    jobs = [(s, seed, relax, max_embed_attempts, xtb_fmax) for s in smiles]
    # "spawn": a fork would inherit the parent's already-initialised OpenMP runtime (and thread count).
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(omp_threads,),
    ) as pool:
        return list(pool.map(_embed_or_none, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
