"""COV/MAT evaluation (spec §1.7): metrics on hand-computed matrices, aggregation, RDKit RMSD under
rigid motions, scaling and noise, symmetry-aware vs in-order alignment, failures."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402
from rdkit.Geometry import Point3D  # noqa: E402

from molgen_grpo.coverage import (  # noqa: E402
    THRESHOLDS,
    aggregate,
    covmat,
    decode_conformer,
    headline,
    rmsd_matrix,
)
from molgen_grpo.text import encode  # noqa: E402

INF = math.inf
# 2 references x 3 generated; generated 2 failed (no decode): a column of inf
D = np.array([[0.3, 1.0, INF],
              [0.8, 0.6, INF]])


# ---------------------------------------------------------------------- metrics by hand

def test_covmat_by_hand():
    r = covmat(D, np.array([0.5, 0.6, 0.75, 1.0]))
    # nearest generated per reference: 0.3, 0.6; nearest reference per generated: 0.3, 0.6, inf
    assert r["cov_r"].tolist() == [0.5, 0.5, 1.0, 1.0]  # 0.6 < 0.6 is false: strict
    assert r["cov_p"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])  # the failure stays in N = 3
    assert r["mat_r"] == pytest.approx(0.45) and r["mat_p"] == pytest.approx(0.45)  # over valid ones
    assert r["valid"] == pytest.approx(2 / 3) and (r["n_ref"], r["n_gen"]) == (2, 3)


def test_all_failed_molecule_and_nan_entries():
    r = covmat(np.array([[INF, np.nan]]), np.array([0.5, 3.0]))
    assert r["cov_r"].tolist() == [0, 0] and r["cov_p"].tolist() == [0, 0]
    assert math.isnan(r["mat_r"]) and math.isnan(r["mat_p"]) and r["valid"] == 0
    with pytest.raises(ValueError, match="shape"):
        covmat(np.zeros((0, 2)))


def test_threshold_grid():
    assert len(THRESHOLDS) == 60 and THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 3.0
    assert THRESHOLDS[14] == 0.75 and np.allclose(np.diff(THRESHOLDS), 0.05)


def test_aggregate_and_headline_by_hand():
    t = np.array([0.5, 0.75])
    results = [covmat(D, t), covmat(np.array([[INF, INF]]), t), covmat(np.array([[0.1]]), t)]
    s = aggregate(results)
    # COV-R at 0.75: 1, 0, 1 -> mean 2/3, median 1; at 0.5: 0.5, 0, 1 -> mean 0.5, median 0.5
    assert s["cov_r_mean"] == pytest.approx([0.5, 2 / 3]) and s["cov_r_median"].tolist() == [0.5, 1.0]
    # COV-P at 0.75: 2/3, 0, 1 -> mean 5/9, median 2/3
    assert s["cov_p_mean"][1] == pytest.approx(5 / 9) and s["cov_p_median"][1] == pytest.approx(2 / 3)
    # MAT over the two molecules with a valid conformer: 0.45 and 0.1
    assert s["mat_r_mean"] == pytest.approx(0.275) and s["mat_r_median"] == pytest.approx(0.275)
    assert s["molecules"] == 3 and s["molecules_without_valid"] == 1
    assert s["valid"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    flat = headline(s, t, at=0.75)
    assert flat["cov_r_mean"] == pytest.approx(2 / 3) and flat["cov_r_median"] == 1.0
    assert flat["mat_p_mean"] == pytest.approx(0.275) and flat["molecules_without_valid"] == 1.0
    with pytest.raises(ValueError, match="not on the grid"):
        headline(s, t, at=0.3)


# ---------------------------------------------------------------------- RDKit RMSD

def embedded(smiles: str, n: int = 2, seed: int = 7) -> Chem.Mol:
    # (seed 0 would give n identical conformers: RDKit derives each conformer's seed from it)
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMultipleConfs(mol, numConfs=n, randomSeed=seed)
    return Chem.RemoveHs(mol)


def one(mol: Chem.Mol, conf_id: int = 0) -> Chem.Mol:
    """A copy of ``mol`` holding only conformer ``conf_id``."""
    return Chem.Mol(mol, confId=conf_id)


def moved(mol: Chem.Mol, fn) -> Chem.Mol:
    """A copy with coordinates ``fn(positions [n, 3]) -> [n, 3]``."""
    out = Chem.Mol(mol)
    conf = out.GetConformer()
    for i, p in enumerate(fn(conf.GetPositions())):
        conf.SetAtomPosition(i, Point3D(*map(float, p)))
    return out


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def kabsch_rmsd(x: np.ndarray, y: np.ndarray) -> float:
    """RMSD of ``y`` onto ``x`` (same atom order) after the optimal rotation and translation."""
    x, y = x - x.mean(0), y - y.mean(0)
    u, _, vt = np.linalg.svd(y.T @ x)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1, 1, d]) @ vt
    return float(np.sqrt(((y @ r - x) ** 2).sum(1).mean()))


PARACETAMOL = "Oc1ccc(NC(C)=O)cc1"  # not canonical: decoding reorders the atoms


def test_rigid_motion_gives_zero_even_in_another_atom_order():
    ref = one(embedded(PARACETAMOL))
    rigid = moved(ref, lambda p: p @ rotation([1, 2, 3], 1.1).T + np.array([4.0, -2.0, 7.5]))
    # through the text format: canonical atom order, coordinates truncated to 4 decimals
    decoded = decode_conformer("[CONFORMER]" + encode(rigid).enriched + "[/CONFORMER]<|endoftext|>")
    assert [a.GetSymbol() for a in decoded.GetAtoms()] != [a.GetSymbol() for a in ref.GetAtoms()]  # reordered
    for symmetry in (True, False):
        d = rmsd_matrix([ref], [rigid, decoded], symmetry=symmetry)
        assert d.shape == (1, 2) and d[0, 0] < 1e-6 and d[0, 1] < 3e-4


def test_uniform_scaling_has_a_closed_form_rmsd():
    # a copy scaled by s about the centroid aligns best unrotated: RMSD = (s - 1) * RMS radius
    ref = one(embedded(PARACETAMOL))
    pos = ref.GetConformer().GetPositions()
    centre, s = pos.mean(0), 1.1
    scaled = moved(ref, lambda p: centre + s * (p - centre))
    expected = (s - 1) * math.sqrt(((pos - centre) ** 2).sum(1).mean())
    for symmetry in (True, False):
        assert rmsd_matrix([ref], [scaled], symmetry=symmetry)[0, 0] == pytest.approx(expected, abs=1e-6)


def test_noise_matches_an_independent_kabsch():
    mols = embedded(PARACETAMOL, n=3)
    refs = [one(mols, c.GetId()) for c in mols.GetConformers()]
    rng = np.random.default_rng(0)
    gens = [moved(refs[0], lambda p: p + rng.normal(0, 0.2, p.shape)) for _ in range(2)]
    d_order = rmsd_matrix(refs, gens, symmetry=False)
    d_best = rmsd_matrix(refs, gens, symmetry=True)
    for i, ref in enumerate(refs):
        for j, gen in enumerate(gens):
            want = kabsch_rmsd(ref.GetConformer().GetPositions(), gen.GetConformer().GetPositions())
            assert d_order[i, j] == pytest.approx(want, abs=1e-5)
            assert d_best[i, j] <= want + 1e-6  # ring-flip symmetry can only lower it
    assert 0.05 < d_order[0, 0] < 0.4  # noise of 0.2 Å per coordinate, partly aligned away
    assert d_order[1:, :].min() > d_order[0, :].max()  # the other references are other conformers
    # with seed 7, reference 1 is reference 0 with the phenol ring flipped: only GetBestRMS sees it
    assert d_best[1, 0] < 0.4 < 0.8 < d_order[1, 0]


def test_symmetry_aware_rmsd_is_lower_for_swapped_equivalent_atoms():
    ref = one(embedded("CC(C)O"))  # atoms 0 and 2 are the equivalent methyl carbons
    swapped = moved(ref, lambda p: p[[2, 1, 0, 3]])
    best = rmsd_matrix([ref], [swapped], symmetry=True)[0, 0]
    in_order = rmsd_matrix([ref], [swapped], symmetry=False)[0, 0]
    assert best < 1e-6 and in_order > 0.3


def test_failures_are_infinite_columns():
    ref = one(embedded("CCO"))
    other = one(embedded("CCN"))
    broken = decode_conformer("[CONFORMER][C]<0,0,0>[C]<1.5,0,0")  # unclosed block
    assert broken is None and decode_conformer("[C]<0,0,0>(") is None
    d = rmsd_matrix([ref, ref], [ref, None, other, broken])
    assert d.shape == (2, 4) and np.all(d[:, 0] < 1e-6) and np.all(np.isinf(d[:, 1:]))
    r = covmat(d)
    assert r["valid"] == 0.25 and r["cov_p"][-1] == 0.25 and r["cov_r"][0] == 1.0 and r["mat_p"] < 1e-6
