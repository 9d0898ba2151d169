"""QM9 geometries relaxed with GFN2-xTB must be EDM-stable, RDKit-valid and reproduce their SMILES.

Exclusion rule (documented, checked, not silent): EDM's fixed bond-length windows cannot express bonds
whose length is set by conjugation. Aromatic C-C (~1.39 Å) sits on the C=C threshold (134 + 5 pm), amide
C-N (~1.34 Å) falls under the C=N threshold, and single bonds between triple bonds (~1.36 Å) look double.
EDM's own QM9 DFT geometries are only 95.2 % molecule-stable for this reason. A molecule is excluded from
the stability/round-trip assertions only if it is unstable *and* at least one of its conjugated bonds got
an order different from the Kekulé order; every non-conjugated bond must always come out right, the
connectivity must always be exact, and at most 20 % of the sample may be excluded.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from .chem_testdata import (
    QM9_SAMPLE,
    QM9_SAMPLE_DRAW,
    QM9_SAMPLE_SEED,
    QM9_SMILES_PATH,
    reference_bond_matrix,
)
from elign.chem.bonds import infer_bond_orders
from elign.chem.stability import check_stability, check_stability_batch

rdkit_mol = pytest.importorskip("elign.chem.rdkit_mol")

MAX_EXCLUDED_FRACTION = 0.20


def test_sample_is_the_seeded_draw():
    """The literal sample is the documented seeded draw from the shared QM9 SMILES file."""
    if not QM9_SMILES_PATH.is_file():
        pytest.skip(f"{QM9_SMILES_PATH} not available")
    lines = [ln.strip() for ln in QM9_SMILES_PATH.read_text().splitlines() if ln.strip()]
    drawn = random.Random(QM9_SAMPLE_SEED).sample(lines, QM9_SAMPLE_DRAW)
    it = iter(drawn)
    assert all(any(s == d for d in it) for s in QM9_SAMPLE), "sample is not an ordered subset of the draw"
    assert len(QM9_SAMPLE) == 40


def _classify(mols):
    rows = []
    for mol in mols:
        ref, conj = reference_bond_matrix(mol.smiles)
        inferred = infer_bond_orders(mol.positions, mol.symbols)
        stab = check_stability(mol.positions, mol.symbols, bond_orders=inferred)
        smiles = rdkit_mol.to_smiles(rdkit_mol.build_molecule(mol.positions, mol.symbols, inferred))
        wrong = inferred != ref
        rows.append(
            dict(
                smiles=mol.smiles,
                out=smiles,
                stable=stab.molecule_stable,
                connectivity_ok=bool(np.array_equal(inferred > 0, ref > 0)),
                nonconj_wrong=int(np.triu(wrong & ~conj).sum()),
                conj_wrong=int(np.triu(wrong & conj).sum()),
            )
        )
    return rows


def test_qm9_sample_stable_valid_and_round_trips(qm9_geometries):
    mols, per_mol = qm9_geometries
    rows = _classify(mols)
    for r in rows:
        # Distance-based perception must always find exactly the right bonds ...
        assert r["connectivity_ok"], f"{r['smiles']}: inferred connectivity differs"
        # ... with the right order wherever conjugation does not blur the length.
        assert r["nonconj_wrong"] == 0, f"{r['smiles']}: non-conjugated bond with wrong order"
    excluded = [r for r in rows if not r["stable"] and r["conj_wrong"] > 0]
    kept = [r for r in rows if r not in excluded]
    for r in kept:
        assert r["stable"], f"{r['smiles']} unstable without a conjugation explanation"
        assert r["out"] == r["smiles"], f"round trip {r['smiles']} -> {r['out']}"
    # Stable molecules are exactly those whose every bond order is right, hence all round-trip.
    assert all(r["conj_wrong"] > 0 for r in excluded)
    assert len(excluded) <= MAX_EXCLUDED_FRACTION * len(rows), [r["smiles"] for r in excluded]

    n = len(rows)
    print(
        f"\nQM9 sample n={n}: molecule-stable {sum(r['stable'] for r in rows) / n:.3f}, "
        f"RDKit-valid {sum(r['out'] is not None for r in rows) / n:.3f}, "
        f"SMILES match {sum(r['out'] == r['smiles'] for r in rows) / n:.3f}; "
        f"excluded (conjugation) {[r['smiles'] for r in excluded]}; ETKDG+MMFF+xTB {per_mol:.2f} s/molecule"
    )


def test_batched_helpers_agree_on_padded_qm9_batch(qm9_geometries):
    mols, _ = qm9_geometries
    n_max = max(len(m.symbols) for m in mols)
    b = len(mols)
    pos = np.full((b, n_max, 3), 1e3)  # garbage at padding must not matter
    z = np.full((b, n_max), 99)
    mask = np.zeros((b, n_max), dtype=bool)
    for i, m in enumerate(mols):
        n = len(m.symbols)
        pos[i, :n], mask[i, :n] = m.positions, True
        z[i, :n] = [{"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}[s] for s in m.symbols]
    batch = check_stability_batch(pos, z, mask)
    smiles = rdkit_mol.smiles_batch(pos, z, mask, bond_orders=batch.bond_orders)
    for i, m in enumerate(mols):
        single = check_stability(m.positions, m.symbols)
        assert batch.molecule_stable[i] == single.molecule_stable
        np.testing.assert_array_equal(batch.molecule(i).bond_orders, single.bond_orders)
        assert smiles[i] == rdkit_mol.geometry_to_smiles(m.positions, m.symbols)


def test_gaussian_noise_destabilises(qm9_geometries):
    """0.3 Å isotropic noise on every atom breaks EDM stability of every (previously stable) molecule."""
    mols, _ = qm9_geometries
    rng = np.random.default_rng(0)
    stable = [m for m in mols if check_stability(m.positions, m.symbols).molecule_stable]
    assert len(stable) >= 30
    still_stable = []
    for m in stable:
        noisy = m.positions + rng.normal(scale=0.3, size=m.positions.shape)
        if check_stability(noisy, m.symbols).molecule_stable:
            still_stable.append(m.smiles)
    assert still_stable == []


def test_stretched_c_h_bond_is_unstable_but_valid(qm9_geometries):
    """Pulling one H off its carbon (to 1.25 Å > 109 + 10 pm) leaves both atoms one bond short.

    RDKit still sanitises the molecule (implicit H refills the carbon; the lone H is a smaller
    fragment), so the SMILES is unchanged: EDM's "valid but unstable" case.
    """
    mols, _ = qm9_geometries
    mol = next(m for m in mols if check_stability(m.positions, m.symbols).molecule_stable)
    ref, _ = reference_bond_matrix(mol.smiles)
    h = next(i for i, s in enumerate(mol.symbols) if s == "H" and mol.symbols[int(np.argmax(ref[i]))] == "C")
    c = int(np.argmax(ref[h]))
    pos = mol.positions.copy()
    u = (pos[h] - pos[c]) / np.linalg.norm(pos[h] - pos[c])
    pos[h] = pos[c] + 1.25 * u
    res = check_stability(pos, mol.symbols)
    assert not res.molecule_stable
    assert res.num_stable_atoms == res.num_atoms - 2
    assert res.valence_missing[h] == 1 and res.valence_missing[c] == 1
    assert res.valence_excess.sum() == 0
    assert rdkit_mol.geometry_to_smiles(pos, mol.symbols) == mol.smiles


def test_triazine_is_the_documented_conjugation_exclusion():
    """A QM9 line the tables cannot express: aromatic C-N (~1.33 Å) is below the C=N threshold (1.34 Å).

    Every ring C-N comes out double, so the ring carbons are 5-valent: unstable and RDKit-invalid. The
    classification used above must attribute this to conjugated bonds only.
    """
    pytest.importorskip("tblite")
    from elign.chem.geometry import embed_many

    (mol,) = embed_many(["CC(=O)c1ncncn1"], seed=0, relax="xtb")
    (row,) = _classify([mol])
    assert row["connectivity_ok"] and row["nonconj_wrong"] == 0
    assert not row["stable"] and row["conj_wrong"] > 0
    assert row["out"] is None
