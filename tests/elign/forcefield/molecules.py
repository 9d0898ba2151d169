"""Small real molecules and helpers shared by the force-field tests."""

from __future__ import annotations

import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from elign.forcefield.base import ForceField

Molecule = tuple[np.ndarray, np.ndarray]

# Experimental gas-phase water: O-H 0.9572 Å, H-O-H 104.52°.
_ANGLE = np.deg2rad(104.52) / 2
WATER: Molecule = (
    np.array([8, 1, 1]),
    np.array(
        [
            [0.0, 0.0, 0.0],
            [0.9572 * np.sin(_ANGLE), 0.0, 0.9572 * np.cos(_ANGLE)],
            [-0.9572 * np.sin(_ANGLE), 0.0, 0.9572 * np.cos(_ANGLE)],
        ]
    ),
)


def embed(smiles: str, seed: int = 0, noise: float = 0.0) -> Molecule:
    """ETKDG geometry (Å) of ``smiles`` with explicit H, plus Gaussian noise of ``noise`` Å."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"ETKDG failed for {smiles}")
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    positions = mol.GetConformer().GetPositions()
    positions = positions + np.random.default_rng(seed).normal(scale=noise, size=positions.shape)
    return numbers, positions


def pad(molecules: list[Molecule], num_atoms: int | None = None, front: int = 0):
    """Padded ``(positions [B,N,3] float64, atomic_numbers [B,N], mask [B,N])``.

    ``front`` padding slots are put *before* each molecule's atoms (masks need not be a prefix);
    padding slots get junk numbers/positions so a backend that reads them would notice.
    """
    n = num_atoms or max(len(z) for z, _ in molecules) + front
    b = len(molecules)
    pos = torch.full((b, n, 3), 123.0, dtype=torch.float64)
    z = torch.full((b, n), 6, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.bool)
    for i, (numbers, coords) in enumerate(molecules):
        k = len(numbers)
        pos[i, front : front + k] = torch.as_tensor(coords)
        z[i, front : front + k] = torch.as_tensor(numbers)
        mask[i, front : front + k] = True
    return pos, z, mask


def finite_difference_forces(ff: ForceField, molecule: Molecule, h: float) -> np.ndarray:
    """Central-difference forces ``-(E(x+h) - E(x-h)) / 2h`` in eV/Å, all 2·3n displaced
    geometries evaluated in ONE batched call (so this also exercises batching)."""
    numbers, coords = molecule
    displaced = []
    for a in range(len(numbers)):
        for d in range(3):
            for sign in (1.0, -1.0):
                x = coords.copy()
                x[a, d] += sign * h
                displaced.append((numbers, x))
    res = ff(*pad(displaced))
    assert bool(res.ok.all()), res.reason_counts()
    e = res.energy.numpy().reshape(len(numbers), 3, 2)
    return -(e[..., 0] - e[..., 1]) / (2 * h)
