"""Shared data and helpers of the chemistry tests (fixtures live in ``conftest.py``).

The sample is written out literally so the tests do not need the shared data file at run time;
``test_chem_qm9_roundtrip.py::test_sample_is_the_seeded_draw`` re-derives it from the file when present.
Derivation: ``random.Random(QM9_SAMPLE_SEED).sample(lines, 48)`` over the non-empty lines of
``qm9_smiles.txt``, keeping, in order, the first 40 that ETKDG embeds within 3 seeds (4 of the 48 are
strained cages with fixed stereo that ETKDG cannot embed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

QM9_SMILES_PATH = Path(os.environ.get("ELIGN_QM9_SMILES", Path(__file__).resolve().parents[3].parent / "shared" / "data" / "qm9_smiles.txt"))
QM9_SAMPLE_SEED = 2024
QM9_SAMPLE_DRAW = 48

QM9_SAMPLE: tuple[str, ...] = (
    "CC(C)[C@@]1(C)CC(=O)N1", "C#Cc1ccn2c1CC2", "C#C[C@@H](C)CC(N)=O", "CC#CCCC1CC1",
    "C[C@H]1CC(C)(C)[C@]1(C)O", "C#C[C@@H]1CNC(=O)C1=O", "C[C@@]1(CO)OCCC1=O", "O[C@H]1C[C@H]1n1cccc1",
    "C[C@H]1OCCC[C@H]1O", "C[C@@H]1OCC[C@@]12O[C@@H]2C", "C[C@@H]1C=CCC=CCC1", "O=C1CC=C[C@H]1N1CC1",
    "O=CC1=N[C@@H](CO)CO1", "Cn1ccnc1OC=O", "C[C@H]1[C@H]2CC(=O)C[C@@H]12", "C#CC1=CCOC[C@@H]1C",
    "CCC1=CCOC1=NC", "C[C@@H]1[C@H](C)[C@@H]1OCC=O", "C[C@H]1C[C@H]1C(C)(C)C#N", "C1=CCC2(CC1)COC2",
    "CC1=CC[C@H](C)C=CC1", "CC1=N[C@@H](C(C)C)CO1", "CC1=CC(=O)C[C@@]12CN2", "CC(C)N=COCCO",
    "COCC#CC(=O)CO", "C[C@H]1[C@H]2C[C@]1(C#N)O2", "C[C@H]1CN(C(N)=O)[C@H]1C", "O=C(O)CNC1CC1",
    "CC[C@H]1C=CC[C@H]1OC", "NCC#C[C@@H](O)C(=O)O", "C[C@@]1(O)C[C@@H](O)[C@H]2C[C@H]21", "Cc1nnc2occn12",
    "N#C[C@H]1[C@@H](N)[C@H]2OC[C@@H]12", "C[C@@H]1C[C@H]2C=C[C@@H](C1)O2", "C[C@H]1N[C@]12[C@H](O)C[C@@H]2O",
    "O=C1[C@@H]2O[C@@H]2[C@]1(O)CO", "C[C@@H](CCO)C1(C)CC1", "CCCCC[C@@H](O)CC", "O=CO[C@@H]1CCC1=NO",
    "CCOc1cccn1C",
)


def reference_bond_matrix(smiles: str) -> tuple[np.ndarray, np.ndarray]:
    """Kekulé bond orders ``[N, N]`` and conjugation flags ``[N, N]`` of ``AddHs(MolFromSmiles(smiles))``.

    ``embed_smiles`` keeps that atom order, so these matrices index the embedded geometry directly.
    """
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    Chem.Kekulize(mol, clearAromaticFlags=True)
    n = mol.GetNumAtoms()
    orders = np.zeros((n, n), dtype=np.int64)
    conj = np.zeros((n, n), dtype=bool)
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        orders[i, j] = orders[j, i] = int(b.GetBondTypeAsDouble())
        conj[i, j] = conj[j, i] = b.GetIsConjugated()
    return orders, conj


_TETRA = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float) / np.sqrt(3)


def methane(n_h: int = 4, ch: float = 1.09) -> tuple[np.ndarray, list[str]]:
    """C at the origin with ``n_h`` hydrogens on tetrahedral directions at ``ch`` Å."""
    return np.vstack([np.zeros(3), ch * _TETRA[:n_h]]), ["C"] + ["H"] * n_h


def water() -> tuple[np.ndarray, list[str]]:
    """O at the origin, two H at 0.96 Å with a 104.5 degree angle."""
    a = np.deg2rad(104.5 / 2)
    s, c = 0.96 * np.sin(a), 0.96 * np.cos(a)
    return np.array([[0.0, 0.0, 0.0], [s, c, 0.0], [-s, c, 0.0]]), ["O", "H", "H"]

