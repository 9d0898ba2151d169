"""EDM stability on hand-built geometries, valence deviations, batching."""

from __future__ import annotations

import numpy as np
import pytest

from .chem_testdata import methane, water
from elign.chem.stability import check_stability, check_stability_batch, valence_gaps


def test_methane_and_water_are_stable():
    for pos, el in (methane(), water()):
        r = check_stability(pos, el)
        assert r.molecule_stable and r.num_stable_atoms == r.num_atoms == len(el)
        assert r.atom_stability == 1.0
        assert (r.valence_missing == 0).all() and (r.valence_excess == 0).all()


def test_methyl_radical_misses_one_bond_on_carbon_only():
    pos, el = methane(3)
    r = check_stability(pos, el)
    assert not r.molecule_stable
    assert r.num_stable_atoms == 3 and r.num_atoms == 4
    np.testing.assert_array_equal(r.valence, [3, 1, 1, 1])
    np.testing.assert_array_equal(r.valence_missing, [1, 0, 0, 0])
    np.testing.assert_array_equal(r.atom_stable, [False, True, True, True])


def test_compressed_hydrogens_give_excess():
    # Two H only 0.80 Å apart (< 74 + 10 pm) on methane: each H has valence 2, excess 1.
    pos, el = methane()
    pos[2] = pos[1] + 0.80 * (pos[2] - pos[1]) / np.linalg.norm(pos[2] - pos[1])
    r = check_stability(pos, el)
    assert not r.molecule_stable
    assert r.valence[1] == 2 and r.valence_excess[1] == 1 and r.valence_missing[1] == 0


def test_multi_valence_gaps_and_nearest_choice():
    # P allows {3, 5}; S only 4 in EDM's table; C 4.
    miss, exc = valence_gaps(np.array([2, 3, 4, 5, 6, 4, 5]), np.array([15, 15, 15, 15, 15, 16, 6]))
    np.testing.assert_array_equal(miss, [1, 0, 1, 0, np.inf, 0, np.inf])
    np.testing.assert_array_equal(exc, [np.inf, 0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="allowed valence"):
        valence_gaps(np.array([1]), np.array([2]))  # He: no entry


def test_batch_matches_single_and_pools_atom_stability():
    torch = pytest.importorskip("torch")
    mols = [methane(), methane(3), water()]
    n_max = 5
    pos = np.zeros((3, n_max, 3))
    z = np.zeros((3, n_max), dtype=int)
    mask = np.zeros((3, n_max), dtype=bool)
    zmap = {"C": 6, "H": 1, "O": 8}
    for i, (p, el) in enumerate(mols):
        pos[i, : len(el)], mask[i, : len(el)] = p, True
        z[i, : len(el)] = [zmap[e] for e in el]
    res = check_stability_batch(torch.tensor(pos), torch.tensor(z), torch.tensor(mask))
    np.testing.assert_array_equal(res.molecule_stable, [True, False, True])
    np.testing.assert_array_equal(res.num_atoms, [5, 4, 3])
    np.testing.assert_array_equal(res.num_stable_atoms, [5, 3, 3])
    assert res.molecule_stability == pytest.approx(2 / 3)
    assert res.atom_stability == pytest.approx(11 / 12)  # pooled over atoms, as EDM
    np.testing.assert_allclose(res.atom_stability_per_molecule, [1.0, 0.75, 1.0])
    assert not res.atom_stable[~mask].any() and (res.valence[~mask] == 0).all()
    for i, (p, el) in enumerate(mols):
        single = check_stability(p, el)
        got = res.molecule(i)
        for field in ("atom_stable", "valence", "valence_missing", "valence_excess", "bond_orders"):
            np.testing.assert_array_equal(getattr(got, field), getattr(single, field))


def test_precomputed_bond_orders_are_used():
    pos, el = methane()
    orders = np.zeros((5, 5), dtype=int)  # claim no bonds at all
    r = check_stability(pos, el, bond_orders=orders)
    assert r.num_stable_atoms == 0 and r.valence_missing.tolist() == [4, 1, 1, 1, 1]


def test_empty_molecule_is_stable_like_edm():
    r = check_stability(np.zeros((0, 3)), [])
    assert r.molecule_stable and r.num_atoms == 0 and r.atom_stability == 1.0


def test_count_fragments_on_hand_built_graphs():
    from elign.chem.stability import count_fragments

    bonds = np.zeros((3, 5, 5), dtype=int)
    for i, j in [(0, 1), (1, 2), (3, 4)]:  # molecule 0: a chain of three and a pair
        bonds[0, i, j] = bonds[0, j, i] = 1
    for i, j in [(0, 1), (1, 2), (2, 3), (3, 4)]:  # molecule 1: one chain of five
        bonds[1, i, j] = bonds[1, j, i] = 2
    mask = np.ones((3, 5), dtype=bool)
    mask[2, 3:] = False  # molecule 2: three isolated atoms, two padding slots
    assert count_fragments(bonds, mask).tolist() == [2, 1, 3]
    mask[1, 2] = False  # a padded middle atom cuts the chain
    assert count_fragments(bonds, mask)[1] == 2
