"""Structure metrics (boltz_ft.metrics) on hand-computed cases, against boltz's own functions, and on crambin."""

from __future__ import annotations

import math

import pytest
import torch

from boltz_ft.metrics import (ca_coords, chain_break, clash_fraction, kabsch_rmsd, lddt, per_residue_lddt,
                              structure_metrics, tm_d0, tm_score, tm_score_approx, tmalign_available)

needs_tmalign = pytest.mark.skipif(not tmalign_available(), reason="tmtools (TM-align) not installed")


def random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q if torch.det(q) > 0 else -q).float()


def chain(n: int = 30, seed: int = 0) -> torch.Tensor:
    """A random walk with 3.8 Å steps: a protein-like Cα trace."""
    steps = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), 0)


LINE = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
MOVED = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3.7, 0, 0]])  # last point 0.7 Å off


def test_ca_coords_picks_centre_atoms():
    coords = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    center = torch.zeros(2, 5, dtype=torch.long)
    center[0, 1] = center[1, 4] = 1
    out = ca_coords(coords, center)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[:, 0], coords[:, 1]) and torch.equal(out[:, 1], coords[:, 4])


def test_lddt_hand_computed_four_points():
    # Pairs with the moved point: |Δd| = 0.7 -> ¼(0+1+1+1) = 0.75; 6 of 12 ordered pairs; the others score 1.
    pred = torch.stack([LINE, MOVED])
    mask = torch.ones(4, dtype=torch.bool)
    assert torch.allclose(lddt(pred, LINE, mask), torch.tensor([1.0, 0.875]))
    assert torch.allclose(per_residue_lddt(MOVED, LINE, mask)[0], torch.tensor([2.75 / 3] * 3 + [0.75]))
    # cutoff 2.5 drops the 3 Å pair (0,3): (3·1 + 2·0.75)/5.
    assert torch.allclose(lddt(MOVED, LINE, mask, cutoff=2.5), torch.tensor([0.9]))
    masked = torch.tensor([True, True, True, False])
    assert lddt(MOVED, LINE, masked).item() == 1.0
    per = per_residue_lddt(MOVED, LINE, masked)[0]
    assert torch.allclose(per[:3], torch.ones(3)) and per[3].isnan()


def test_lddt_undefined_is_nan_not_zero():
    one = torch.tensor([True, False, False, False])
    assert lddt(MOVED, LINE, one).isnan().all()
    assert per_residue_lddt(MOVED, LINE, one).isnan().all()
    far = LINE * 100  # no pair under the 15 Å cutoff
    assert lddt(far, far, torch.ones(4)).isnan().all()


def test_lddt_matches_boltz_lddt_dist():
    from boltz.model.loss.confidence import lddt_dist

    g = torch.Generator().manual_seed(1)
    true = chain(40)
    pred = true + 1.5 * torch.randn(3, 40, 3, generator=g)
    mask = torch.rand(40, generator=g) > 0.2
    pair = (mask[:, None] & mask[None, :] & ~torch.eye(40, dtype=torch.bool)).float()
    ref, _ = lddt_dist(torch.cdist(pred, pred), torch.cdist(true, true)[None], pair[None])
    assert torch.allclose(lddt(pred, true, mask), ref, atol=1e-5)
    ref_per, _ = lddt_dist(torch.cdist(pred, pred), torch.cdist(true, true)[None], pair[None], per_atom=True)
    ours = per_residue_lddt(pred, true, mask)
    assert torch.allclose(ours[:, mask], ref_per[:, mask], atol=1e-5) and ours[:, ~mask].isnan().all()


def test_rigid_copy_scores_perfectly():
    true = chain(30)
    copy = true @ random_rotation(3).T + torch.tensor([5.0, -2.0, 7.0])
    mask = torch.ones(30, dtype=torch.bool)
    assert torch.allclose(lddt(copy, true, mask), torch.ones(1), atol=1e-6)
    assert kabsch_rmsd(copy, true, mask).item() < 1e-4
    assert torch.allclose(tm_score_approx(copy, true, mask), torch.ones(1), atol=1e-5)
    if tmalign_available():
        assert torch.allclose(tm_score(copy, true, mask, method="tmalign"), torch.ones(1), atol=1e-4)


def test_kabsch_rmsd_hand_computed_and_reflection():
    # Two points 2 Å apart vs 4 Å apart: centred at ±1 and ±2 -> RMSD 1.
    two_true = torch.tensor([[0.0, 0, 0], [2, 0, 0]])
    two_pred = torch.tensor([[10.0, 0, 0], [10, 4, 0]])
    assert math.isclose(kabsch_rmsd(two_pred, two_true, torch.ones(2)).item(), 1.0, abs_tol=1e-5)
    # A square of side 2 vs side 4 (same centre, rotated 90°): corner radius √2 vs 2√2 -> RMSD √2.
    square = torch.tensor([[1.0, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]])
    assert math.isclose(kabsch_rmsd((2 * square) @ random_rotation(0).T, square, torch.ones(4)).item(),
                        math.sqrt(2), abs_tol=1e-5)
    # A chiral set and its mirror image cannot be superposed by a rotation (the reflection fix).
    tetra = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
    assert kabsch_rmsd(tetra * torch.tensor([1.0, 1, -1]), tetra, torch.ones(4)).item() > 0.5
    assert kabsch_rmsd(tetra, tetra, torch.zeros(4)).isnan().all()


def test_kabsch_rmsd_matches_boltz_weighted_rigid_align():
    from boltz.model.loss.diffusionv2 import weighted_rigid_align

    g = torch.Generator().manual_seed(2)
    true = chain(25)
    pred = (true + 2.0 * torch.randn(4, 25, 3, generator=g)) @ random_rotation(5).T
    mask = torch.rand(25, generator=g) > 0.3
    weights = torch.rand(25, generator=g) + 0.5
    aligned = weighted_rigid_align(true.expand_as(pred), pred, weights.expand(4, 25), mask.float().expand(4, 25))
    w = (weights * mask)
    ref = (((aligned - pred) ** 2).sum(-1) * w).sum(-1).div(w.sum()).sqrt()
    assert torch.allclose(kabsch_rmsd(pred, true, mask, weights), ref, atol=1e-4)


def test_tm_d0_and_hand_computed_approx():
    assert math.isclose(tm_d0(100).item(), 1.24 * 85 ** (1 / 3) - 1.8, rel_tol=1e-12)
    assert tm_d0(10).item() == 0.5 and tm_d0(19).item() == 0.5  # below the clamp
    # Two points scaled ×2 stay centred under (weighted) Kabsch: d = 1 Å each, L = 2, d0 = 0.5 -> 1/(1+4).
    two_true = torch.tensor([[0.0, 0, 0], [2, 0, 0]])
    two_pred = torch.tensor([[0.0, 0, 0], [4, 0, 0]])
    assert math.isclose(tm_score_approx(two_pred, two_true, torch.ones(2)).item(), 0.2, abs_tol=1e-6)
    assert tm_score(two_pred, two_true, torch.zeros(2), method="approx").isnan().all()


@needs_tmalign
def test_tmalign_agrees_with_approx_on_noisy_copies_and_nan_when_short():
    true = chain(60, seed=4)
    g = torch.Generator().manual_seed(4)
    pred = true + torch.tensor([0.5, 1.0, 2.0])[:, None, None] * torch.randn(3, 60, 3, generator=g)
    mask = torch.ones(60, dtype=torch.bool)
    exact, approx = tm_score(pred, true, mask, method="tmalign"), tm_score(pred, true, mask, method="approx")
    assert (exact[:-1] < 1).all() and (exact[1:] < exact[:-1]).all()  # more noise, lower score
    assert torch.allclose(exact, approx, atol=0.05)
    unrelated = tm_score(chain(60, seed=9), true, mask, method="tmalign")
    assert unrelated.item() < 0.4
    short = torch.tensor([True, True] + [False] * 58)
    assert tm_score(pred, true, short, method="tmalign").isnan().all()


def clash_setup():
    """Atoms A, B in residue 0 and C in residue 5. Sample 1: C 1 Å from A, B far. Sample 2: B 1 Å from A, C far."""
    coords = torch.tensor([[[0.0, 0, 0], [10, 0, 0], [-1, 0, 0]],
                           [[0.0, 0, 0], [1, 0, 0], [-10, 0, 0]]])
    atom_to_token = torch.eye(2)[[0, 0, 1]]  # A, B -> token 0; C -> token 1
    return coords, torch.ones(3), atom_to_token, torch.tensor([6, 6, 6])


def test_clash_fraction_hand_computed():
    coords, mask, a2t, carbon = clash_setup()
    # Eligible: A-C and B-C (A-B share a residue). Sample 1: A-C clashes (1 Å < 0.75·3.4 Å); sample 2: the
    # 1 Å A-B pair is intra-residue, so nothing clashes.
    out = clash_fraction(coords, mask, a2t, torch.tensor([0, 0]), torch.tensor([0, 5]), carbon)
    assert torch.allclose(out, torch.tensor([0.5, 0.0]))
    atoms = clash_fraction(coords, mask, a2t, torch.tensor([0, 0]), torch.tensor([0, 5]), carbon, normalize="atoms")
    assert torch.allclose(atoms, torch.tensor([2 / 3, 0.0]))
    # Adjacent residues of one chain are not eligible (NaN: nothing to score); of different chains they are.
    assert clash_fraction(coords, mask, a2t, torch.tensor([0, 0]), torch.tensor([0, 1]), carbon).isnan().all()
    assert torch.allclose(clash_fraction(coords, mask, a2t, torch.tensor([0, 1]), torch.tensor([0, 1]), carbon),
                          torch.tensor([0.5, 0.0]))
    assert torch.equal(clash_fraction(coords, mask, a2t.argmax(-1), torch.tensor([0, 0]), torch.tensor([0, 5]),
                                      carbon), out)  # token indices instead of the one-hot
    hydrogen = torch.tensor([6, 6, 1])
    assert clash_fraction(coords, mask, a2t, torch.tensor([0, 0]), torch.tensor([0, 5]), hydrogen).isnan().all()
    masked = torch.tensor([1.0, 1.0, 0.0])
    assert clash_fraction(coords, masked, a2t, torch.tensor([0, 0]), torch.tensor([0, 5]), carbon).isnan().all()
    bonded = torch.tensor([[0.0, 1], [1, 0]])
    assert clash_fraction(coords, mask, a2t, torch.tensor([0, 0]), torch.tensor([0, 5]), carbon,
                          token_bonds=bonded).isnan().all()


def test_clash_threshold_uses_vdw_by_atomic_number():
    a2t, asym, res = torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 0])
    pair = lambda d: torch.tensor([[0.0, 0, 0], [d, 0, 0]])  # noqa: E731
    # C-C: 0.75·(1.7+1.7) = 2.55 Å; N-O: 0.75·(1.6+1.55) = 2.3625 Å (const.vdw_radii[Z-1]).
    cc = torch.tensor([6, 6])
    assert clash_fraction(torch.stack([pair(2.5), pair(2.6)]), torch.ones(2), a2t, asym, res, cc).tolist() == [1, 0]
    no = torch.tensor([7, 8])
    assert clash_fraction(torch.stack([pair(2.35), pair(2.4)]), torch.ones(2), a2t, asym, res, no).tolist() == [1, 0]
    ss = torch.tensor([16, 16])  # a disulfide's 2.05 Å
    assert clash_fraction(pair(2.05), torch.ones(2), a2t, asym, res, ss).isnan().all()
    assert clash_fraction(pair(2.05), torch.ones(2), a2t, asym, res, ss, exempt_disulfides=False).item() == 1


def test_chain_break_hand_computed():
    ca = torch.tensor([[0.0, 0, 0], [3.8, 0, 0], [8.0, 0, 0]])
    ones, same = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long)
    assert math.isclose(chain_break(ca, same, torch.arange(3), ones).item(), 0.2, abs_tol=1e-6)
    assert chain_break(ca, same, torch.tensor([0, 1, 3]), ones).item() < 1e-6  # gap: only the first pair
    assert chain_break(ca, torch.tensor([0, 1, 2]), torch.arange(3), ones).isnan().all()  # three chains
    shuffled = ca[[2, 0, 1]]  # token order does not matter
    assert math.isclose(chain_break(shuffled, same, torch.tensor([2, 0, 1]), ones).item(), 0.2, abs_tol=1e-6)
    ligand = torch.tensor([0, 0, 3])
    assert chain_break(ca, same, torch.arange(3), ones, mol_type=ligand).item() < 1e-6


def test_structure_metrics_on_crambin_truth(crambin_features):
    f = crambin_features
    true = f["coords"][0]
    moved = true @ random_rotation(7).T + 3.0
    out = structure_metrics(torch.stack([true, moved]), f)
    assert set(out) == {"ca_lddt", "rmsd_ca", "tm_score", "clash_fraction", "chain_break"}
    assert all(v.shape == (2,) for v in out.values())
    assert torch.allclose(out["ca_lddt"], torch.ones(2))
    assert (out["rmsd_ca"] < 1e-3).all()
    assert torch.allclose(out["tm_score"], torch.ones(2), atol=1e-4)
    assert (out["clash_fraction"] < 0.01).all()
    assert (out["chain_break"] < 0.2).all()  # crystal Cα-Cα spacing is 3.8 ± a few hundredths


def test_structure_metrics_batched_and_noisy(crambin_features):
    from boltz_ft.data import split_batch

    f = crambin_features
    true = f["coords"][0]
    noisy = true + 2.0 * torch.randn(3, *true.shape, generator=torch.Generator().manual_seed(0))
    flat = structure_metrics(noisy, f, tm_method="approx")
    batched = structure_metrics(noisy, {k: v.unsqueeze(0) for k, v in f.items()}, tm_method="approx")
    split = structure_metrics(noisy, split_batch(f, {"id": "1crn"}), tm_method="approx")
    for key in flat:
        assert torch.allclose(flat[key], batched[key], equal_nan=True)
        assert torch.allclose(flat[key], split[key], equal_nan=True)
    assert (flat["ca_lddt"] < 1).all() and (flat["rmsd_ca"] > 0.5).all() and (flat["tm_score"] < 1).all()
    assert (flat["chain_break"] > 0.5).all()
    unresolved = dict(f, atom_resolved_mask=torch.zeros_like(f["atom_resolved_mask"]))
    empty = structure_metrics(noisy, unresolved)
    assert all(empty[k].isnan().all() for k in ("ca_lddt", "rmsd_ca", "tm_score"))


def test_structure_metrics_physical_terms_on_resolved_atoms(crambin_features):
    # Unresolved atoms sit at the origin in the truth (as in 1bni): scoring the truth needs physical_on_resolved.
    f = dict(crambin_features)
    missing = f["atom_to_token"].argmax(-1).eq(10) & f["atom_pad_mask"].bool()
    f["atom_resolved_mask"] = f["atom_resolved_mask"] & ~missing
    f["coords"] = f["coords"].masked_fill(missing[None, :, None], 0.0)
    everything = structure_metrics(f["coords"][0], f, tm_method="approx")
    resolved = structure_metrics(f["coords"][0], f, tm_method="approx", physical_on_resolved=True)
    assert resolved["chain_break"].item() < 0.1 < everything["chain_break"].item()  # 2 of 23 pairs at the origin
    assert resolved["clash_fraction"].item() <= everything["clash_fraction"].item()
    assert resolved["ca_lddt"].item() == 1.0 and torch.equal(everything["ca_lddt"], resolved["ca_lddt"])


def test_tm_score_auto_falls_back_to_approx(monkeypatch):
    import boltz_ft.metrics as metrics

    true = chain(30, seed=5)
    pred = true + torch.randn(2, 30, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(30, dtype=torch.bool)
    monkeypatch.setattr(metrics, "tmalign_available", lambda: False)
    assert torch.equal(tm_score(pred, true, mask), tm_score_approx(pred, true, mask))
    with pytest.raises(ValueError, match="method"):
        tm_score(pred, true, mask, method="gdt")
