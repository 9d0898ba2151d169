"""Boltz-2's structure losses as pure torch functions returning **per-structure** values (boltz.md §2.1).

boltz reduces each loss to one scalar; GRPO's advantage-weighted denoising (boltz.md §5.1, "cheap surrogate")
needs one value per structure to weight, so every loss here returns ``[B]`` (``B`` = targets × multiplicity
copies, copies of a target adjacent, as boltz lays them out) and :func:`mean_loss` reduces it.

Averaging convention (checked against boltz 2.2 in ``tests/boltz_ft/test_losses.py``): boltz averages every
term as the **unweighted mean over structures of per-structure values**, never as a global ratio:

- ``AtomDiffusion.compute_loss``: ``(mse_b · λ(σ_b)).mean()`` where ``mse_b`` is a ratio per structure;
  ``smooth_lddt_loss``: ``1 − mean_b(lddt_b)`` = ``mean_b(1 − lddt_b)``.
- ``distogramv2.distogram_loss``: ``global_loss = batch_loss.mean()`` with a per-target ratio in ``batch_loss``.

So ``mean_loss(f(...))`` equals boltz's scalar for each ``f`` below. This module imports no boltz: the fallback
model (:mod:`boltz_ft.fallback`) uses it where the package is absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PROTEIN", "DNA", "RNA", "NONPOLYMER", "aligned_mse", "atom_type_weights", "distogram_ce",
           "edm_loss_weight", "mean_loss", "smooth_lddt", "structure_losses", "weighted_kabsch_align"]

# boltz.data.const.chain_type_ids (the values of the ``mol_type`` feature).
PROTEIN, DNA, RNA, NONPOLYMER = 0, 1, 2, 3
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # Angstrom; the smooth lDDT's sigmoid centres


def mean_loss(per_structure: Tensor) -> Tensor:
    """The batch scalar boltz reports: the unweighted mean of ``[B]`` per-structure values (module docstring)."""
    return per_structure.mean()


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's λ(σ) = (σ² + σ_d²) / (σ·σ_d)², which makes the expected loss at init ~1 at every noise level.

    Args:
        sigma: ``[B]`` noise levels (Angstrom). sigma_data: σ_d (16 Å in Boltz-2).
    Returns:
        ``[B]``.
    """
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def weighted_kabsch_align(true: Tensor, pred: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """Rigidly superpose ``true`` onto ``pred`` with weighted Kabsch (boltz's ``weighted_rigid_align``).

    The truth moves, not the prediction, so the loss's gradient flows through ``pred`` only; the result is
    detached (as boltz's ``aligned_coords.detach_()``). The SVD runs in float32 with the determinant fix, so a
    reflection is never returned.

    Args:
        true: ``[B, M, 3]`` coordinates to move. pred: ``[B, M, 3]`` reference (used detached).
        weights: ``[B, M]`` per-atom weights. mask: ``[B, M]`` atoms taking part (0/1 or bool).
    Returns:
        ``[B, M, 3]`` the aligned ``true`` (every atom moved, masked ones included), detached.
    """
    true, pred = true.detach(), pred.detach()
    dtype = true.dtype
    w = (mask.to(weights.dtype) * weights).detach().unsqueeze(-1)  # [B, M, 1]
    true_centroid = (true * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True)
    pred_centroid = (pred * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True)
    true_c, pred_c = true - true_centroid, pred - pred_centroid
    cov = torch.einsum("bni,bnj->bij", w * pred_c, true_c).float()  # [B, 3, 3]
    u, _, vh = torch.linalg.svd(cov)
    det = torch.det(u @ vh)  # -1 when the optimal orthogonal map is a reflection
    fix = torch.ones(cov.shape[:-1], dtype=cov.dtype, device=cov.device)
    fix[..., -1] = det
    rot = (u * fix.unsqueeze(-2)) @ vh  # U · diag(1, 1, det) · Vᵀ
    aligned = torch.einsum("bni,bji->bnj", true_c, rot.to(dtype)) + pred_centroid
    return aligned.detach()


def aligned_mse(pred: Tensor, true: Tensor, sigma: Tensor, atom_weights: Tensor, resolved_mask: Tensor,
                sigma_data: float) -> Tensor:
    """λ(σ)-weighted MSE of the denoised coordinates against the truth Kabsch-aligned onto them.

    ``λ(σ_b) · Σ_m w·r·‖pred − align(true)‖² / (3·Σ_m w·r + 1e-5)`` with r the resolved mask and w the atom
    weights (1 + 5·nucleotide + 10·ligand, :func:`atom_type_weights`); the weights enter the alignment too.

    Args:
        pred: ``[B, M, 3]`` denoised coordinates (gradient flows here).
        true: ``[B, M, 3]`` ground truth in the frame the noise was added in (any rigid motion is removed).
        sigma: ``[B]`` noise levels. atom_weights: ``[B, M]``. resolved_mask: ``[B, M]`` atoms with a truth.
    Returns:
        ``[B]`` per-structure loss.
    """
    pred = pred.float()
    mask = resolved_mask.float()
    weights = atom_weights.float()
    target = weighted_kabsch_align(true.float(), pred, weights, mask)
    sq = ((pred - target) ** 2).sum(-1)  # [B, M]
    mse = (sq * weights * mask).sum(-1) / ((3 * weights * mask).sum(-1) + 1e-5)
    return mse * edm_loss_weight(sigma.float(), sigma_data)


def smooth_lddt(pred: Tensor, true: Tensor, is_nucleotide: Tensor, mask: Tensor, multiplicity: int = 1,
                nucleic_acid_cutoff: float = 30.0, other_cutoff: float = 15.0) -> Tensor:
    """1 − smooth lDDT per structure (boltz's ``smooth_lddt_loss``, AF3 Algorithm 27), a differentiable lDDT.

    Pairs (i ≠ j, both in ``mask``) with true distance below 15 Å (30 Å when atom i is a nucleotide, as boltz
    tests the row atom) each score ¼·Σ_c sigmoid(c − |d_pred − d_true|), c ∈ {.5, 1, 2, 4}; the structure's
    lDDT is the sum over pairs / (pairs + 1e-5).

    Args:
        pred: ``[B·multiplicity, M, 3]`` predicted coordinates.
        true: ``[B, M, 3]`` or ``[B·multiplicity, M, 3]`` truth (only its distances are used, so its frame
            does not matter). is_nucleotide, mask: ``[B, M]`` (one row per target, shared by its copies).
        multiplicity: copies per target in ``pred`` (adjacent), as boltz's argument.
    Returns:
        ``[B·multiplicity]`` per-structure ``1 − lDDT``.
    """
    n = pred.shape[0]
    if true.shape[0] == n // multiplicity and multiplicity > 1:
        true = true.repeat_interleave(multiplicity, 0)
    rows = torch.arange(n, device=pred.device) // multiplicity
    nuc, valid = is_nucleotide.float()[rows], mask.float()[rows]  # [n, M]
    pred, true = pred.float(), true.float()
    eye = torch.eye(pred.shape[1], device=pred.device, dtype=pred.dtype)
    out = []
    for b in range(n):  # one [M, M] at a time: production M is 4608 and multiplicity 32
        d_true = torch.cdist(true[b], true[b])
        nuc_row = nuc[b].unsqueeze(-1)
        pairs = nuc_row * (d_true < nucleic_acid_cutoff).float() + (1 - nuc_row) * (d_true < other_cutoff).float()
        pairs = pairs * (1 - eye) * valid[b].unsqueeze(-1) * valid[b].unsqueeze(-2)
        i, j = pairs.nonzero(as_tuple=True)  # only the pairs in range: far fewer than M² at production size
        d_pred = F.pairwise_distance(pred[b, i], pred[b, j])  # [P] (with its 1e-6 eps, as boltz)
        delta = (d_true[i, j] - d_pred).abs()
        score = sum(torch.sigmoid(c - delta) for c in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
        out.append(score.sum() / (i.numel() + 1e-5))
    return 1.0 - torch.stack(out)


def distogram_ce(logits: Tensor, target: Tensor, mask: Tensor, aggregate: bool = True) -> Tensor:
    """Distogram cross-entropy per target (boltz's ``distogramv2.distogram_loss``).

    ``aggregate`` (boltz's default): the K conformers' one-hot targets are summed and normalised per pair
    (``P = t / max(Σ_bins t, 1)``); the CE ``−Σ P log softmax(logits)`` is summed over token pairs with both
    tokens in ``mask`` and i ≠ j, and divided by (number of such pairs + 1e-5). Without ``aggregate``, the loss
    against each conformer is taken for each of the D predicted distograms, the best D kept, and the K averaged.

    Args:
        logits: ``[B, N, N, D, bins]`` (D = 1 when aggregating) or ``[B, N, N, bins]``.
        target: ``[B, N, N, K, bins]`` one-hot (boltz's ``disto_target``). mask: ``[B, N]`` (``token_disto_mask``).
    Returns:
        ``[B]`` per-target CE.
    """
    logits = logits.float()
    if logits.dim() == 4:
        logits = logits.unsqueeze(3)
    if logits.dim() != 5 or target.dim() != 5:
        raise ValueError(f"expected logits [B,N,N,D,bins] and target [B,N,N,K,bins]; got {tuple(logits.shape)}, "
                         f"{tuple(target.shape)}")
    n = mask.shape[1]
    pairs = mask.float()[:, None, :] * mask.float()[:, :, None]
    pairs = pairs * (1 - torch.eye(n, device=logits.device, dtype=logits.dtype))  # [B, N, N]
    denom = 1e-5 + pairs.sum(dim=(-1, -2))  # [B]
    log_q = F.log_softmax(logits, dim=-1)  # [B, N, N, D, bins]
    if aggregate:
        if logits.shape[3] != 1:
            raise ValueError("cannot aggregate the target distogram when the model predicts D > 1 distograms")
        summed = target.float().sum(dim=3)  # [B, N, N, bins]
        p = summed / summed.sum(-1, keepdim=True).clamp(min=1)
        errors = -(p * log_q[:, :, :, 0]).sum(-1)  # [B, N, N]
        return (errors * pairs).sum(dim=(-1, -2)) / denom
    per_conformer = []
    for k in range(target.shape[3]):
        errors = -(target[:, :, :, k:k + 1].float() * log_q).sum(-1)  # [B, N, N, D]
        per_conformer.append((errors * pairs.unsqueeze(-1)).sum(dim=(1, 2)) / denom.unsqueeze(-1))  # [B, D]
    return torch.stack(per_conformer, dim=1).min(dim=-1).values.mean(dim=1)


def atom_type_weights(atom_to_token: Tensor, mol_type: Tensor, nucleotide_loss_weight: float = 5.0,
                      ligand_loss_weight: float = 10.0) -> tuple[Tensor, Tensor]:
    """Per-atom MSE weights 1 + 5·[DNA/RNA] + 10·[ligand] and the nucleotide flags, from token types.

    Args:
        atom_to_token: ``[B, M, N]`` one-hot. mol_type: ``[B, N]`` (0 protein, 1 DNA, 2 RNA, 3 ligand).
    Returns:
        ``([B, M] weights, [B, M] is_nucleotide as float)``.
    """
    atom_type = torch.bmm(atom_to_token.float(), mol_type.unsqueeze(-1).float()).squeeze(-1).long()
    nucleotide = ((atom_type == DNA) | (atom_type == RNA)).float()
    ligand = (atom_type == NONPOLYMER).float()
    return 1 + nucleotide_loss_weight * nucleotide + ligand_loss_weight * ligand, nucleotide


def structure_losses(denoised: Tensor, aligned_true: Tensor, coords: Tensor, sigmas: Tensor,
                     atom_to_token: Tensor, mol_type: Tensor, resolved_mask: Tensor, sigma_data: float,
                     multiplicity: int = 1, add_smooth_lddt_loss: bool = True, nucleotide_loss_weight: float = 5.0,
                     ligand_loss_weight: float = 10.0) -> dict[str, Tensor]:
    """``AtomDiffusion.compute_loss`` per structure: aligned MSE (+ smooth lDDT), ``[B·multiplicity]`` each.

    Args:
        denoised: ``[B·mult, M, 3]`` denoiser output. aligned_true: ``[B·mult, M, 3]`` the (augmented) truth the
            noise was added to. coords: ``[B, M, 3]`` or ``[B·mult, M, 3]`` truth for the lDDT's distances.
        sigmas: ``[B·mult]``. atom_to_token ``[B, M, N]``, mol_type ``[B, N]``, resolved_mask ``[B, M]``: per target.
    Returns:
        ``{"loss", "mse_loss", "smooth_lddt_loss"}``, each ``[B·mult]`` (``smooth_lddt_loss`` zeros when off);
        :func:`mean_loss` of each is boltz's scalar of the same name.
    """
    weights, nucleotide = atom_type_weights(atom_to_token, mol_type, nucleotide_loss_weight, ligand_loss_weight)
    resolved = resolved_mask.float()
    mse = aligned_mse(denoised, aligned_true, sigmas, weights.repeat_interleave(multiplicity, 0),
                      resolved.repeat_interleave(multiplicity, 0), sigma_data)
    lddt = (smooth_lddt(denoised, coords, nucleotide, resolved, multiplicity) if add_smooth_lddt_loss
            else torch.zeros_like(mse))
    return {"loss": mse + lddt, "mse_loss": mse, "smooth_lddt_loss": lddt}
