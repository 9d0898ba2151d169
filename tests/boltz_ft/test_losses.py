"""boltz_ft.losses: hand-computed small cases, and boltz's own losses reproduced (mean of ours = boltz's scalar)."""

import math

import pytest
import torch

from boltz_ft import losses as L


def _sig_mean(delta: float) -> float:
    """¼·Σ_c sigmoid(c − |Δd|) over the lDDT thresholds."""
    return sum(1 / (1 + math.exp(-(c - delta))) for c in (0.5, 1.0, 2.0, 4.0)) / 4


def _rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q if torch.det(q) > 0 else -q).float()


# ------------------------------------------------------------------ hand-computed cases


def test_edm_loss_weight():
    assert float(L.edm_loss_weight(torch.tensor(16.0), 16.0)) == pytest.approx(2 / 256)  # (2σ_d²) / σ_d⁴
    assert L.edm_loss_weight(torch.tensor([1.0, 2.0]), 1.0).tolist() == pytest.approx([2.0, 5 / 4])


def test_kabsch_recovers_a_rigid_motion_ignores_masked_atoms_and_never_reflects():
    pred = torch.randn(1, 12, 3, generator=torch.Generator().manual_seed(0)) * 5
    true = pred @ _rotation(1).T + torch.tensor([3.0, -2.0, 7.0])
    ones = torch.ones(1, 12)
    assert torch.allclose(L.weighted_kabsch_align(true, pred, ones, ones), pred, atol=1e-4)
    # A masked atom may sit anywhere: the superposition of the others does not move.
    mask = ones.clone()
    mask[0, 3] = 0
    moved = true.clone()
    moved[0, 3] += 100.0
    aligned = L.weighted_kabsch_align(moved, pred, ones, mask)
    assert torch.allclose(aligned[0, mask[0].bool()], pred[0, mask[0].bool()], atol=1e-4)
    # The mirror image cannot be superposed by a rotation: the result keeps the truth's handedness.
    mirror = true * torch.tensor([-1.0, 1.0, 1.0])
    out = L.weighted_kabsch_align(mirror, pred, ones, ones)[0]
    vol = lambda x: torch.det(x[1:4] - x[0])  # noqa: E731 (signed volume of the first four atoms)
    assert torch.sign(vol(out)) == torch.sign(vol(mirror[0])) != torch.sign(vol(pred[0]))
    assert torch.allclose(torch.cdist(out, out), torch.cdist(mirror[0], mirror[0]), atol=1e-3)
    assert not L.weighted_kabsch_align(true.requires_grad_(), pred, ones, ones).requires_grad


def test_aligned_mse_of_a_uniform_expansion():
    # pred = 1.1 × (truth about its weighted centroid): the covariance is symmetric PSD, so the best rotation is
    # the identity and the residual is 0.1 × the centred truth.
    true = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 4], [1, 1, 1]]])
    weights = torch.tensor([[1.0, 1, 1, 11, 6]])  # a ligand atom (1 + 10) and a nucleotide atom (1 + 5)
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])  # the last atom is unresolved
    w = (weights * mask)[0]
    centroid = (true[0] * w[:, None]).sum(0) / w.sum()
    pred = (centroid + 1.1 * (true[0] - centroid))[None]
    sigma = torch.tensor([8.0])
    expected = 0.01 * float((w * ((true[0] - centroid) ** 2).sum(-1)).sum()) / (3 * float(w.sum()) + 1e-5)
    expected *= float(L.edm_loss_weight(sigma, 16.0))
    out = L.aligned_mse(pred.requires_grad_(), true, sigma, weights, mask, 16.0)
    assert out.shape == (1,) and float(out.detach()) == pytest.approx(expected, rel=1e-4)
    out.sum().backward()
    assert pred.grad.abs().sum() > 0
    # A rigid motion of the truth costs nothing.
    moved = true @ _rotation(2).T + 4.0
    assert float(L.aligned_mse(moved, true, sigma, weights, mask, 16.0)) < 1e-6


def test_smooth_lddt_pairs_cutoffs_and_nucleotide_rows():
    true = torch.tensor([[[0.0, 0, 0], [3, 0, 0], [20, 0, 0]]])  # a-b 3 Å, a-c 20 Å, b-c 17 Å
    pred = torch.tensor([[[0.0, 0, 0], [5, 0, 0], [20, 0, 0]]])  # a-b 5 Å (Δ 2), a-c 20 Å (Δ 0), b-c 15 Å (Δ 2)
    mask = torch.ones(1, 3)
    protein = torch.zeros(1, 3)
    # Protein: only a-b is within 15 Å.
    assert float(L.smooth_lddt(pred, true, protein, mask)) == pytest.approx(1 - _sig_mean(2.0), abs=1e-5)
    # c is a nucleotide: its rows (c-a, c-b) use the 30 Å cutoff, a-c and b-c (protein rows) still 15 Å.
    nuc_c = torch.tensor([[0.0, 0, 1]])
    expected = 1 - (2 * _sig_mean(2.0) + _sig_mean(0.0) + _sig_mean(2.0)) / 4
    assert float(L.smooth_lddt(pred, true, nuc_c, mask)) == pytest.approx(expected, abs=1e-5)
    # Masking b leaves no pair among protein atoms: score 0 / (0 + 1e-5), loss 1.
    assert float(L.smooth_lddt(pred, true, protein, torch.tensor([[1.0, 0, 1]]))) == pytest.approx(1.0)
    # Multiplicity: two copies per target share the target's truth and masks; values per copy.
    preds = torch.cat([pred, true])  # copy 0 as above, copy 1 perfect
    out = L.smooth_lddt(preds, true, protein, mask, multiplicity=2)
    assert out.tolist() == pytest.approx([1 - _sig_mean(2.0), 1 - _sig_mean(0.0)], abs=1e-5)


def test_distogram_ce_normalisation_diagonal_and_conformers():
    bins, n = 4, 3
    target = torch.zeros(1, n, n, 1, bins)
    target[..., 0, 1] = 1
    logits = torch.zeros(1, n, n, 1, bins)
    logits[0, range(n), range(n), 0, 1] = -50.0  # the diagonal is excluded whatever it predicts
    mask = torch.ones(1, n)
    assert float(L.distogram_ce(logits, target, mask)) == pytest.approx(math.log(bins) * 6 / (6 + 1e-5), rel=1e-6)
    assert float(L.distogram_ce(logits, target, torch.tensor([[1.0, 1, 0]]))) == pytest.approx(math.log(bins), rel=1e-4)
    assert float(L.distogram_ce(logits[:, :, :, 0], target, mask)) == pytest.approx(math.log(bins), rel=1e-4)
    # Two conformers in bins 0 and 1: aggregated, P = (½, ½); the logits favour bin 0.
    two = torch.zeros(1, n, n, 2, bins)
    two[..., 0, 0] = 1
    two[..., 1, 1] = 1
    logits = torch.tensor([2.0, 0, 0, 0]).expand(1, n, n, 1, bins)
    log_q = torch.log_softmax(torch.tensor([2.0, 0, 0, 0]), -1)
    agg = float(L.distogram_ce(logits, two, mask))
    assert agg == pytest.approx(float(-(log_q[0] + log_q[1]) / 2), rel=1e-4)
    # Not aggregated: the loss to each conformer (best of D predicted distograms), averaged over conformers.
    per_k = float(L.distogram_ce(logits, two, mask, aggregate=False))
    assert per_k == pytest.approx(float(-(log_q[0] + log_q[1]) / 2), rel=1e-4)
    with pytest.raises(ValueError, match="aggregate"):
        L.distogram_ce(torch.zeros(1, n, n, 2, bins), target, mask)


def test_atom_type_weights():
    atom_to_token = torch.eye(4)[None].repeat_interleave(2, 1)  # two atoms per token
    weights, nucleotide = L.atom_type_weights(atom_to_token, torch.tensor([[0, 1, 2, 3]]))
    assert weights[0].tolist() == [1, 1, 6, 6, 6, 6, 11, 11]
    assert nucleotide[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


# ------------------------------------------------------------------ boltz's own implementation


def test_kabsch_matches_boltz_weighted_rigid_align():
    from boltz.model.loss.diffusionv2 import weighted_rigid_align

    g = torch.Generator().manual_seed(3)
    true, pred = torch.randn(3, 20, 3, generator=g) * 8, torch.randn(3, 20, 3, generator=g) * 8
    weights = 1 + 10 * torch.rand(3, 20, generator=g)
    mask = (torch.rand(3, 20, generator=g) > 0.2).float()
    ours = L.weighted_kabsch_align(true, pred, weights, mask)
    assert torch.allclose(ours, weighted_rigid_align(true, pred, weights, mask), atol=1e-5)


@pytest.mark.parametrize("loss_args", [{}, {"add_smooth_lddt_loss": False, "nucleotide_loss_weight": 2.0,
                                            "ligand_loss_weight": 3.0}])
def test_structure_losses_match_boltz_compute_loss(tiny_boltz2, crambin_features, loss_args):
    """boltz's training step on two targets × 3 noise levels; our per-structure values average to its scalars."""
    from boltz.model.loss.diffusionv2 import smooth_lddt_loss

    from boltz_ft.core import Boltz2Core

    feats = {k: torch.stack([v, v]) for k, v in crambin_features.items() if torch.is_tensor(v)}
    feats["mol_type"] = feats["mol_type"].clone()
    feats["mol_type"][1, :4], feats["mol_type"][1, 4:7] = 1, 3  # DNA and ligand atom weights in target 1
    feats["atom_resolved_mask"] = feats["atom_resolved_mask"].clone()
    feats["atom_resolved_mask"][0, :20] = False  # some unresolved atoms in target 0
    mult = 3
    torch.manual_seed(0)
    core = Boltz2Core(tiny_boltz2.train())
    trunk = core.trunk(feats)
    step = core.step_features(feats, mult)
    module = tiny_boltz2.structure_module
    out = module(s_inputs=trunk.s_inputs, s_trunk=trunk.s, feats=step, multiplicity=mult,
                 diffusion_conditioning=trunk.conditioning)
    ref = module.compute_loss(step, out, multiplicity=mult, **loss_args)
    ours = L.structure_losses(out["denoised_atom_coords"], out["aligned_true_atom_coords"], step["coords"],
                              out["sigmas"], feats["atom_to_token"], feats["mol_type"], feats["atom_resolved_mask"],
                              module.sigma_data, mult, **loss_args)
    assert all(v.shape == (2 * mult,) for v in ours.values())
    assert float(L.mean_loss(ours["loss"])) == pytest.approx(float(ref["loss"]), abs=1e-5)
    for key in ("mse_loss", "smooth_lddt_loss"):
        assert float(L.mean_loss(ours[key])) == pytest.approx(float(ref["loss_breakdown"][key]), abs=1e-5)
    assert len(set(out["sigmas"].tolist())) == 2  # synchronised: one level per target
    if loss_args.get("add_smooth_lddt_loss", True):  # and per structure, boltz's function on each copy alone
        nuc = L.atom_type_weights(feats["atom_to_token"], feats["mol_type"])[1]
        for i in range(2 * mult):
            one = smooth_lddt_loss(out["denoised_atom_coords"][i:i + 1], step["coords"][i:i + 1], nuc[i // mult:][:1],
                                   feats["atom_resolved_mask"][i // mult:][:1].float())
            assert float(ours["smooth_lddt_loss"][i]) == pytest.approx(float(one), abs=1e-5)
    ours["loss"].mean().backward()  # gradients reach the model through the denoised coordinates
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_distogram_ce_matches_boltz(crambin_features):
    from boltz.model.loss.distogramv2 import distogram_loss

    feats = {k: torch.stack([v, v]) for k, v in crambin_features.items() if torch.is_tensor(v)}
    feats["token_disto_mask"] = feats["token_disto_mask"].clone()
    feats["token_disto_mask"][1, -5:] = 0
    n = feats["token_disto_mask"].shape[1]
    logits = torch.randn(2, n, n, 1, 64, generator=torch.Generator().manual_seed(0)) * 3
    ref_global, ref_batch = distogram_loss({"pdistogram": logits}, feats)
    ours = L.distogram_ce(logits, feats["disto_target"], feats["token_disto_mask"])
    assert torch.allclose(ours, ref_batch, atol=1e-5) and float(L.mean_loss(ours)) == pytest.approx(float(ref_global))
    # Without aggregation: two predicted distograms against two conformers.
    two = {**feats, "disto_target": torch.cat([feats["disto_target"], feats["disto_target"].roll(1, -1)], 3)}
    logits2 = torch.randn(2, n, n, 2, 64, generator=torch.Generator().manual_seed(1))
    ref_global, ref_batch = distogram_loss({"pdistogram": logits2}, two, aggregate_distogram=False)
    ours = L.distogram_ce(logits2, two["disto_target"], two["token_disto_mask"], aggregate=False)
    assert torch.allclose(ours, ref_batch, atol=1e-5) and float(L.mean_loss(ours)) == pytest.approx(float(ref_global))
