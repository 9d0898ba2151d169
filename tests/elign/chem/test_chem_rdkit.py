"""RDKit building and SMILES: validity, largest fragment, stereo from 3D, silenced logs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit")

from elign.chem.rdkit_mol import build_molecule, geometry_to_smiles, smiles_batch, to_smiles  # noqa: E402
from .chem_testdata import methane, water  # noqa: E402


def test_all_atoms_bonds_and_conformer():
    pos, el = methane()
    mol = build_molecule(pos, el)
    assert mol.GetNumAtoms() == 5 and mol.GetNumBonds() == 4
    np.testing.assert_allclose(mol.GetConformer().GetPositions(), pos)
    assert to_smiles(mol) == "C"


def test_pentavalent_carbon_is_invalid_and_quiet(capfd):
    # Five H at 1.09 Å around C (H-H >= 1.0 Å, so only C-H bonds): valence 5 fails sanitisation.
    dirs = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-0.5, 0.866, 0], [-0.5, -0.866, 0]])
    pos = np.vstack([np.zeros(3), 1.09 * dirs])
    assert geometry_to_smiles(pos, ["C"] + ["H"] * 5) is None
    assert capfd.readouterr().err == ""  # RDKit's valence error must not reach stderr


def test_under_bonded_atom_is_valid_via_implicit_h():
    pos, el = methane(3)  # unstable by EDM, but RDKit fills the missing H implicitly
    assert geometry_to_smiles(pos, el) == "C"


def test_largest_fragment_counts_hydrogens():
    (pc, ec), (pw, ew) = methane(), water()
    pos = np.vstack([pw, pc + 10.0])  # water first: the larger methane must still win (5 vs 3 atoms)
    assert geometry_to_smiles(pos, ew + ec) == "C"


def test_stereo_from_3d_and_mirror_image():
    from elign.chem.geometry import embed_smiles

    mol = embed_smiles("C[C@H](O)CC", seed=0, relax="mmff")
    assert geometry_to_smiles(mol.positions, mol.symbols) == "CC[C@H](C)O"
    mirrored = mol.positions * np.array([-1.0, 1.0, 1.0])
    assert geometry_to_smiles(mirrored, mol.symbols) == "CC[C@@H](C)O"
    assert geometry_to_smiles(mol.positions, mol.symbols, stereo="none") == "CCC(C)O"


def test_double_bond_stereo_only_in_all_mode():
    from elign.chem.geometry import embed_smiles

    mol = embed_smiles("C/C=C/C", seed=0, relax="mmff")
    assert geometry_to_smiles(mol.positions, mol.symbols) == "CC=CC"
    assert geometry_to_smiles(mol.positions, mol.symbols, stereo="all") == "C/C=C/C"


def test_smiles_batch_with_invalid_member():
    dirs = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-0.5, 0.866, 0], [-0.5, -0.866, 0]])
    bad = np.vstack([np.zeros(3), 1.09 * dirs])
    good, _ = methane()
    pos = np.stack([bad, np.vstack([good, np.zeros(3)])])
    z = np.array([[6, 1, 1, 1, 1, 1], [6, 1, 1, 1, 1, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=bool)
    assert smiles_batch(pos, z, mask) == [None, "C"]
