"""Structure metrics of predicted samples against a target: evaluation scores now, GRPO rewards next (boltz.md §5.2).

Every function is batched over S samples (a single ``[N,3]`` / ``[M,3]`` input counts as S = 1) and returns
NaN, never 0, where a score is undefined (no scored pair, no residue), so that a reward built from it cannot
silently reward an empty mask. No superposition is used by lDDT; RMSD and TM-score superpose with Kabsch.

Notation: S samples, N tokens (one per residue; one per ligand atom), M atoms (padded).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

__all__ = ["ca_coords", "chain_break", "clash_fraction", "kabsch_align", "kabsch_rmsd", "lddt",
           "per_residue_lddt", "structure_metrics", "tm_d0", "tm_score", "tm_score_approx", "tmalign_available"]

LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
CA_CA_DISTANCE = 3.8
PROTEIN = 0  # boltz.data.const.chain_type_ids["PROTEIN"]
SULFUR = 16


def _samples(x: Tensor) -> Tensor:
    """``[S,K,3]`` unchanged; ``[K,3]`` -> ``[1,K,3]``."""
    return x.unsqueeze(0) if x.dim() == 2 else x


def _nan_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, NaN elsewhere (never 0 for an empty set)."""
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, float("nan")))


def _pairwise(x: Tensor) -> Tensor:
    """Exact Euclidean distances ``[...,K,3] -> [...,K,K]`` (cdist's matmul shortcut loses ~1e-3 Å)."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def ca_coords(coords: Tensor, token_to_center_atom: Tensor) -> Tensor:
    """Centre-atom (Cα for protein) coordinates of each token: ``[S,M,3], [N,M] one-hot -> [S,N,3]``."""
    return torch.einsum("nm,smc->snc", token_to_center_atom.to(coords.dtype), _samples(coords))


def _lddt_terms(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Per-pair lDDT scores and the scored-pair mask, both ``[S,N,N]``."""
    pred = _samples(pred)
    d_true, d_pred = _pairwise(true.to(pred)), _pairwise(pred)
    m = mask.bool().to(pred.device)
    eye = torch.eye(m.shape[-1], dtype=torch.bool, device=pred.device)
    pair = m[..., :, None] & m[..., None, :] & ~eye & (d_true < cutoff)
    l1 = (d_pred - d_true).abs()
    score = sum((l1 < t).to(pred.dtype) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    pair = pair.to(pred.dtype).expand_as(score)
    return score * pair, pair


def lddt(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float = 15.0) -> Tensor:
    """Global lDDT without superposition (boltz ``loss/confidence.lddt_dist`` semantics): ``[S]``.

    Scored pairs: i != j, both in ``mask``, true distance < ``cutoff``; each scores ¼·Σ_t [|d_pred − d_true| < t]
    for t in 0.5, 1, 2, 4 Å; the result is the mean over scored (ordered) pairs, NaN if there is none.

    Shapes: pred ``[S,N,3]`` (e.g. Cα), true ``[N,3]`` (or ``[S,N,3]``), mask ``[N]`` bool/float.
    """
    score, pair = _lddt_terms(pred, true, mask, cutoff)
    return _nan_div(score.sum((-2, -1)), pair.sum((-2, -1)))


def per_residue_lddt(pred: Tensor, true: Tensor, mask: Tensor, cutoff: float = 15.0) -> Tensor:
    """lDDT of each point over its scored partners: ``[S,N]``, NaN for points with no scored pair (or masked)."""
    score, pair = _lddt_terms(pred, true, mask, cutoff)
    return _nan_div(score.sum(-1), pair.sum(-1))


def kabsch_align(pred: Tensor, true: Tensor, weights: Tensor) -> Tensor:
    """Superpose ``pred [S,N,3]`` onto ``true [N,3]`` minimising Σ w·|R·p + t − q|²; returns ``[S,N,3]``.

    Weighted Kabsch by SVD (float64) with the reflection fix det(R) = +1. ``weights [N]`` or ``[S,N]`` (0 = ignored;
    ignored points are still moved). A sample with total weight 0 comes back unchanged.
    """
    pred = _samples(pred)
    dtype = pred.dtype
    w = weights.to(pred.device, torch.float64).expand(pred.shape[:-1])[..., None]  # [S,N,1]
    p = torch.where(w > 0, pred.to(torch.float64), 0.0)
    q = torch.where(w > 0, true.to(p).expand_as(p), 0.0)
    ok = w.sum(-2, keepdim=True) > 0
    wsum = torch.where(ok, w.sum(-2, keepdim=True), 1.0)
    pc, qc = (p * w).sum(-2, keepdim=True) / wsum, (q * w).sum(-2, keepdim=True) / wsum
    h = ((p - pc) * w).transpose(-1, -2) @ (q - qc)  # [S,3,3]
    u, _, vh = torch.linalg.svd(h)
    d = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0).to(u)
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rot = u @ fix @ vh  # row-vector convention: p_aligned = p @ rot
    aligned = (pred.to(torch.float64) - pc) @ rot + qc
    return torch.where(ok, aligned, pred.to(torch.float64)).to(dtype)


def kabsch_rmsd(pred: Tensor, true: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """(Weighted) RMSD after optimal superposition on the masked points: ``[S,N,3], [N,3], [N] -> [S]``.

    ``weights [N]`` (optional) weight both the superposition and the mean, as boltz's ``weighted_rigid_align``.
    NaN when no point is in the mask.
    """
    pred = _samples(pred)
    w = mask.to(pred.device, torch.float64) * (1.0 if weights is None else weights.to(pred.device, torch.float64))
    err = ((kabsch_align(pred, true, w).to(torch.float64) - true.to(pred.device, torch.float64)) ** 2).sum(-1)
    w = w.expand(err.shape)
    err = torch.where(w > 0, err, 0.0)
    return _nan_div((err * w).sum(-1), w.sum(-1)).sqrt().to(pred.dtype)


def tm_d0(length: Tensor | float) -> Tensor:
    """TM-score distance scale d0(L) = 1.24·(L − 15)^{1/3} − 1.8 Å, clamped at ≥ 0.5 Å (Zhang & Skolnick 2004)."""
    length = torch.as_tensor(length, dtype=torch.float64)
    return (1.24 * (length - 15).clamp_min(0) ** (1 / 3) - 1.8).clamp_min(0.5)


def tm_score_approx(pred: Tensor, true: Tensor, mask: Tensor, iterations: int = 8) -> Tensor:
    """Sequence-dependent TM-score by iterated weighted Kabsch (spec §5.2 approximation): ``[S]``.

    TM = (1/L)·Σ_i 1/(1 + (d_i/d0)²) over the L masked points, residue i of ``pred`` paired with residue i of
    ``true``. Starts from the all-point Kabsch superposition, then re-superposes with the TM weights
    1/(1 + (d/d0)²) ``iterations`` times and keeps the best score: a lower bound of the exact TM-score (whose
    search over superpositions is wider); 1 for a rigid copy. NaN when L = 0.
    """
    pred = _samples(pred)
    m, t = mask.to(pred.device, torch.float64), true.to(pred.device, torch.float64)
    d0, w, best = tm_d0(m.sum()), m, None
    for _ in range(iterations + 1):
        d = (kabsch_align(pred, true, w).to(torch.float64) - t).norm(dim=-1)
        per = 1.0 / (1.0 + (d / d0) ** 2)
        score = _nan_div((per * m).sum(-1), m.sum(-1).expand(per.shape[:-1]))
        best = score if best is None else torch.fmax(best, score)
        w = per * m
    return best.to(pred.dtype)


def tmalign_available() -> bool:
    """Whether ``tmtools`` (the TM-align C++ code) imports."""
    return importlib.util.find_spec("tmtools") is not None


def _tm_score_tmalign(pred: Tensor, true: Tensor, mask: Tensor, sequence: str | None) -> Tensor:
    """TM-align (``tmtools.tm_align``) per sample, normalised by the true structure's masked length."""
    from tmtools import tm_align

    pred = _samples(pred)
    keep = mask.bool().cpu()
    length = int(keep.sum())
    out = torch.full((pred.shape[0],), float("nan"), dtype=pred.dtype, device=pred.device)
    if length < 3:  # TM-align refuses chains shorter than 3
        return out
    seq = "A" * length if sequence is None else "".join(c for c, k in zip(sequence, keep.tolist()) if k)
    ref = true.detach().cpu().to(torch.float64)[keep].numpy()
    for s, sample in enumerate(pred.detach().cpu().to(torch.float64)):
        out[s] = tm_align(sample[keep].numpy(), ref, seq, seq).tm_norm_chain2
    return out


def tm_score(pred: Tensor, true: Tensor, mask: Tensor,
             method: Literal["auto", "tmalign", "approx"] = "auto", sequence: str | None = None) -> Tensor:
    """TM-score of each sample against ``true`` on the masked points: ``[S,N,3], [N,3], [N] -> [S]``.

    ``tmalign``: TM-align (the field's reference code, via PyPI ``tmtools``, GPLv3) on the masked points,
    normalised by the true length. TM-align searches a sequence-independent alignment, so it can exceed the
    residue-paired TM-score on shifted predictions. ``approx``: :func:`tm_score_approx` (pure torch, residue-paired,
    differentiable inputs allowed, a lower bound). ``auto``: tmalign when ``tmtools`` imports, else approx.
    ``sequence`` (length N, one-letter) only labels TM-align's alignment. NaN when fewer than 3 points (tmalign)
    or none (approx).
    """
    if method == "auto":
        method = "tmalign" if tmalign_available() else "approx"
    if method == "tmalign":
        return _tm_score_tmalign(pred, true, mask, sequence)
    if method == "approx":
        return tm_score_approx(pred, true, mask)
    raise ValueError(f"tm_score method must be auto, tmalign or approx, not {method!r}")


def _vdw_table(device: torch.device) -> Tensor:
    """van der Waals radii indexed by atomic number (``const.vdw_radii[Z-1]``; index 0 = 0 for padding)."""
    from boltz.data import const

    return torch.tensor([0.0, *const.vdw_radii], device=device)


def clash_fraction(coords: Tensor, atom_mask: Tensor, atom_to_token: Tensor, asym_id: Tensor,
                   residue_index: Tensor, element: Tensor, token_bonds: Tensor | None = None, scale: float = 0.75,
                   normalize: Literal["pairs", "atoms"] = "pairs", exempt_disulfides: bool = True) -> Tensor:
    """Fraction of non-bonded heavy-atom pairs closer than ``scale``·(vdW_i + vdW_j): ``[S]`` (boltz.md §5.2 R3).

    Eligible pairs (unordered): both atoms in ``atom_mask`` and heavy (Z > 1), and either in different chains or in
    the same chain with |Δresidue_index| > 1 (peptide/phosphodiester neighbours and intra-residue pairs are
    bonded or geometrically close by construction). Token pairs marked in ``token_bonds`` (covalent links such as
    ligand-protein bonds) are excluded, and so are S–S pairs when ``exempt_disulfides`` (a disulfide's 2.05 Å is
    below 0.75·(1.8+1.8) Å and boltz's parsed structures carry no disulfide bonds). Radii: ``const.vdw_radii``.

    ``normalize="pairs"``: clashing eligible pairs / eligible pairs. ``"atoms"``: atoms in ≥ 1 clash / atoms with ≥ 1
    eligible partner (larger values; less dependent on system size). NaN when nothing is eligible.

    Args:
        coords: ``[S,M,3]``. atom_mask: ``[M]``. atom_to_token: ``[M,N]`` one-hot (or ``[M]`` token indices).
        asym_id, residue_index: ``[N]``. element: ``[M]`` atomic numbers. token_bonds: ``[N,N]`` (optional).
    """
    coords = _samples(coords)
    device = coords.device
    tok = atom_to_token.argmax(-1) if atom_to_token.dim() == 2 else atom_to_token.long()
    chain, res = asym_id.long().to(device)[tok], residue_index.long().to(device)[tok]
    element = element.long().to(device)
    heavy = atom_mask.bool().to(device) & (element > 1)
    upper = torch.ones(len(heavy), len(heavy), dtype=torch.bool, device=device).triu(1)
    eligible = heavy[:, None] & heavy[None, :] & upper
    eligible &= (chain[:, None] != chain[None, :]) | ((res[:, None] - res[None, :]).abs() > 1)
    if token_bonds is not None:
        eligible &= ~token_bonds.to(device).bool()[tok[:, None], tok[None, :]]
    if exempt_disulfides:
        eligible &= ~((element[:, None] == SULFUR) & (element[None, :] == SULFUR))
    radius = _vdw_table(device)[element.clamp(0, 118)]
    limit = scale * (radius[:, None] + radius[None, :])
    if normalize not in ("pairs", "atoms"):
        raise ValueError(f"normalize must be pairs or atoms, not {normalize!r}")
    out = []
    for sample in coords:  # one [M,M] distance matrix at a time
        clash = (_pairwise(sample.float()) < limit) & eligible
        if normalize == "pairs":
            out.append(_nan_div(clash.sum().double(), eligible.sum().double()))
        else:  # atoms
            sym_clash, sym_elig = clash | clash.T, eligible | eligible.T
            out.append(_nan_div(sym_clash.any(-1).sum().double(), sym_elig.any(-1).sum().double()))
    return torch.stack(out).to(coords.dtype)


def chain_break(ca: Tensor, asym_id: Tensor, residue_index: Tensor, mask: Tensor, mol_type: Tensor | None = None,
                ideal: float = CA_CA_DISTANCE) -> Tensor:
    """Mean |d(Cα_i, Cα_{i+1}) − 3.8 Å| over consecutive residues of one chain: ``[S,N,3] -> [S]`` (Å).

    Consecutive = same ``asym_id`` and ``residue_index`` differing by exactly 1 (position in the token array does
    not matter, so crops work); both in ``mask``; both protein when ``mol_type`` is given (nucleotide centre atoms
    are ~6 Å apart). Cis-prolines (~2.9 Å) count as deviations. NaN when no consecutive pair exists.
    """
    ca = _samples(ca)
    m = mask.bool().to(ca.device)
    if mol_type is not None:
        m = m & (mol_type.to(ca.device) == PROTEIN)
    chain, res = asym_id.to(ca.device), residue_index.to(ca.device)
    nxt = m[:, None] & m[None, :] & (chain[:, None] == chain[None, :]) & (res[None, :] - res[:, None] == 1)
    dev = (_pairwise(ca) - ideal).abs()
    w = nxt.to(ca.dtype).expand_as(dev)
    return _nan_div((dev * w).sum((-2, -1)), w.sum((-2, -1)))


def _unbatched(feats: Mapping[str, Any]) -> dict[str, Tensor]:
    """Flat, unbatched feature dict from a §1.3 dict (unbatched or batch axis of size 1) or a split batch."""
    split = isinstance(feats.get("inputs"), Mapping)
    flat = {**feats["inputs"], **feats.get("targets", {})} if split else dict(feats)
    flat = {k: v for k, v in flat.items() if torch.is_tensor(v)}
    if flat["atom_pad_mask"].dim() == 2:
        if flat["atom_pad_mask"].shape[0] != 1:
            raise ValueError(f"structure_metrics takes one target; the batch axis has {flat['atom_pad_mask'].shape[0]}")
        flat = {k: v[0] for k, v in flat.items()}
    return flat


def structure_metrics(sample_coords: Tensor, feats: Mapping[str, Any],
                      tm_method: Literal["auto", "tmalign", "approx"] = "auto",
                      physical_on_resolved: bool = False) -> dict[str, Tensor]:
    """All metrics of S samples of one target: ``[S,M,3]`` (padded atom order of ``feats``) -> {name: ``[S]``}.

    Ground truth: ``coords[0]`` (first conformer). ``ca_lddt`` and ``rmsd_ca``: token centre atoms (Cα; C1' for
    nucleotides; the atom itself for ligand tokens) resolved in the truth. ``tm_score``: the protein tokens of those
    (:func:`tm_score`, ``tm_method``). ``clash_fraction`` (pairs) and ``chain_break``: the prediction only, over all
    real (non-padding) atoms / protein tokens, since a sample predicts unresolved atoms too
    (``physical_on_resolved``: only the truth's resolved ones, e.g. to score the ground truth itself).
    """
    f = _unbatched(feats)
    samples = _samples(sample_coords)
    dtype, f = samples.dtype, {k: v.to(samples.device) for k, v in f.items()}
    true = f["coords"][0] if f["coords"].dim() == 3 else f["coords"]
    center = f["token_to_center_atom"].to(dtype)
    true_ca, pred_ca = center @ true.to(dtype), ca_coords(samples, center)
    token_mask = f["token_pad_mask"].bool()
    resolved = (center @ f["atom_resolved_mask"].to(dtype) > 0.5) & token_mask
    protein = resolved & (f["mol_type"] == PROTEIN)
    element = f["ref_element"].argmax(-1)
    atom_mask = f["atom_resolved_mask"] if physical_on_resolved else f["atom_pad_mask"]
    token_mask = resolved if physical_on_resolved else token_mask
    bonds = f.get("token_bonds")
    bonds = bonds[..., 0] if bonds is not None and bonds.dim() == 3 else bonds
    return {
        "ca_lddt": lddt(pred_ca, true_ca, resolved),
        "rmsd_ca": kabsch_rmsd(pred_ca, true_ca, resolved),
        "tm_score": tm_score(pred_ca, true_ca, protein, method=tm_method),
        "clash_fraction": clash_fraction(samples, atom_mask, f["atom_to_token"], f["asym_id"],
                                         f["residue_index"], element, token_bonds=bonds),
        "chain_break": chain_break(pred_ca, f["asym_id"], f["residue_index"], token_mask, f["mol_type"]),
    }
