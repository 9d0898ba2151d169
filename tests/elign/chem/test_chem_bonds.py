"""EDM bond-order rule: thresholds, table facts, vectorised == scalar, error handling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from elign.chem import bonds
from elign.chem.bonds import (
    bond_order,
    bond_thresholds_pm,
    infer_bond_orders,
    infer_bond_orders_batch,
    threshold_tables_angstrom,
)

# (pair, single, double, triple) typical lengths in pm, from the spec (§2.4) / EDM's tables.
SPEC_LENGTHS = [
    (("C", "H"), 109, None, None),
    (("C", "C"), 154, 134, 120),
    (("C", "N"), 147, 129, 116),
    (("C", "O"), 143, 120, 113),
    (("N", "H"), 101, None, None),
    (("O", "H"), 96, None, None),
    (("N", "N"), 145, 125, 110),
    (("N", "O"), 140, 121, None),
    (("H", "H"), 74, None, None),
    (("C", "F"), 135, None, None),
]


@pytest.mark.parametrize("pair,b1,b2,b3", SPEC_LENGTHS)
def test_thresholds_are_lengths_plus_10_5_3_pm(pair, b1, b2, b3):
    expected = (b1 + 10.0, None if b2 is None else b2 + 5.0, None if b3 is None else b3 + 3.0)
    assert bond_thresholds_pm(*pair) == expected
    assert bond_thresholds_pm(*reversed(pair)) == expected
    z = [{"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}[e] for e in pair]
    dense = [float(t[z[0], z[1]]) for t in threshold_tables_angstrom()]
    np.testing.assert_allclose(dense, [np.nan if e is None else e / 100 for e in expected])


@pytest.mark.parametrize(
    "a,b,thr_pm,below,at",
    [
        ("C", "C", 164, 1, 0),   # single threshold: 154 + 10
        ("C", "C", 139, 2, 1),   # double: 134 + 5
        ("C", "C", 123, 3, 2),   # triple: 120 + 3
        ("C", "H", 119, 1, 0),
        ("H", "C", 119, 1, 0),
        ("C", "N", 157, 1, 0),
        ("C", "N", 134, 2, 1),
        ("C", "O", 153, 1, 0),
        ("C", "O", 125, 2, 1),
        ("O", "H", 106, 1, 0),
        ("H", "H", 84, 1, 0),
        ("N", "H", 111, 1, 0),
    ],
)
def test_strict_inequality_at_exact_thresholds(a, b, thr_pm, below, at):
    d = thr_pm / 100
    eps = 1e-9
    cases = [(d - eps, below), (d + eps, at)]
    if 100 * d == thr_pm:  # exactly representable: d itself is "at" the threshold (strict <)
        cases.append((d, at))
    for dist, want in cases:
        assert bond_order(a, b, dist) == want
    # The matrix version agrees on the same two-atom geometry (atoms on an axis: the distance is exact).
    for dist, want in cases:
        m = infer_bond_orders(np.array([[0.0, 0, 0], [dist, 0, 0]]), [a, b])
        assert m[0, 1] == m[1, 0] == want and m[0, 0] == m[1, 1] == 0


def test_far_and_upgrade_requires_lower_order():
    assert bond_order("C", "C", 3.0) == 0
    assert bond_order("C", "H", 0.5) == 1  # no double entry for C-H: never upgraded however short
    assert bond_order("C", "F", 1.0) == 1
    assert bond_order("N", "O", 1.0) == 2  # N-O has a double but no triple entry
    assert bond_order(6, 8, 1.10) == 3  # atomic numbers work too


def test_c_s_double_bond_is_symmetric():
    # EDM lists C=S under C only; our symmetrised table gives the same answer in both orders.
    assert bond_order("C", "S", 1.60) == bond_order("S", "C", 1.60) == 2


def test_missing_pair_raises_or_is_unbonded_with_check_exists():
    with pytest.raises(ValueError, match="B-C"):
        bond_order("B", "C", 1.5)
    assert bond_order("B", "C", 1.5, check_exists=True) == 0
    with pytest.raises(ValueError, match="no entry"):
        bond_order("Xe", "C", 1.5)
    with pytest.raises(ValueError):
        infer_bond_orders(np.zeros((2, 3)) + [[0, 0, 0], [1.5, 0, 0]], ["B", "C"])


def _edm_oracle(a: str, b: str, d_angstrom: float) -> int:
    """Straight transcription of EDM's nested rule on the dictionary views (independent of the arrays)."""
    d = 100 * d_angstrom
    s1, s2, s3 = bonds.BOND_LENGTHS_SINGLE, bonds.BOND_LENGTHS_DOUBLE, bonds.BOND_LENGTHS_TRIPLE
    m1, m2, m3 = bonds.MARGINS_PM
    if d < s1[a][b] + m1:
        if b in s2.get(a, {}) and d < s2[a][b] + m2:
            if b in s3.get(a, {}) and d < s3[a][b] + m3:
                return 3
            return 2
        return 1
    return 0


def test_vectorised_matches_oracle_for_all_tabulated_pairs():
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in bonds.BOND_LENGTHS_SINGLE for b in bonds.BOND_LENGTHS_SINGLE[a]]
    for a, b in pairs:
        # Distances spread across all windows of this pair.
        dists = rng.uniform(0.9, 1.15, 20) * (bonds.BOND_LENGTHS_SINGLE[a][b] / 100)
        for d in dists:
            want = _edm_oracle(a, b, d)
            assert bond_order(a, b, d) == want
            assert infer_bond_orders(np.array([[0.0, 0, 0], [0, 0, d]]), [a, b])[0, 1] == want


def test_random_qm9_like_cloud_matches_pairwise_loop():
    rng = np.random.default_rng(1)
    symbols = list(rng.choice(list(bonds.QM9_ELEMENTS), size=25))
    pos = rng.uniform(0, 4, size=(25, 3))
    mat = infer_bond_orders(pos, symbols)
    assert mat.dtype == np.int64 and (mat == mat.T).all() and (np.diag(mat) == 0).all()
    for i, j in itertools.combinations(range(25), 2):
        assert mat[i, j] == _edm_oracle(symbols[i], symbols[j], float(np.linalg.norm(pos[i] - pos[j])))
    assert mat.sum() > 0


def test_batch_padding_is_ignored_and_torch_accepted():
    torch = pytest.importorskip("torch")
    pos = np.array([[[0, 0, 0], [1.09, 0, 0], [0, 0, 0.1]]], dtype=np.float32)  # 3rd slot is padding
    z = np.array([[6, 1, 0]])  # 0 at padding would be invalid if it were read
    mask = np.array([[True, True, False]])
    out = infer_bond_orders_batch(torch.from_numpy(pos), torch.from_numpy(z), torch.from_numpy(mask))
    assert out.shape == (1, 3, 3)
    assert out[0, 0, 1] == 1 and out[0, 2].sum() == 0 and out[0, :, 2].sum() == 0
    with pytest.raises(ValueError, match="shape"):
        infer_bond_orders_batch(pos[0], z, mask)
