"""Conformer-ensemble evaluation (spec §1.7): RMSD matrices, COV-R/P and MAT-R/P over a threshold grid.

For one molecule with ``M`` reference conformers and ``N`` generated ones (the protocol samples
``N = 2M``), ``D[i, j]`` is the heavy-atom RMSD of generated conformer ``j`` to reference ``i`` after
optimal rigid alignment. Then, for thresholds ``t`` in 0.05, 0.10, ..., 3.00 Å (headline 0.75 Å):

    COV-R(t) = #{i : min_j D[i, j] < t} / M        MAT-R = mean_i min_j D[i, j]
    COV-P(t) = #{j : min_i D[i, j] < t} / N        MAT-P = mean_j min_i D[i, j]

and each is reported as the mean and the median over molecules.

Failures. Spec §1.7 does not say how failed generations count; here a generated conformer that does
not decode, has another molecular graph than the references (non-isomeric, as the reward's gate, spec
§1.2) or that RDKit cannot align is a column of ``+inf`` (NaN entries are read as ``+inf`` too):

- COV-R: a failure covers no reference; M is unchanged.
- COV-P: a failure counts in N and is never within ``t``: failures lower precision coverage.
- MAT-R / MAT-P: means over the *finite* minima, i.e. over valid generated conformers (as 3DMolGen's
  ``nanmean``); NaN for a molecule with no valid conformer. Across molecules MAT uses ``nanmean`` /
  ``nanmedian`` and the number of molecules without a valid conformer is reported beside it, with
  the share of valid conformers: read MAT together with those two numbers.
- Unlike 3DMolGen's script, a molecule with no valid generation stays in the COV averages (at 0).

RMSD: ``rdMolAlign.GetBestRMS`` (symmetry-aware: the best over all graph automorphisms found by
substructure matching; the evaluation default) or ``rdMolAlign.AlignMol`` with one atom map from a
substructure match of the reference in the generated molecule (``symmetry=False``, the reward's
cheaper in-order alignment). Atom orders are never assumed equal: a decoded conformer comes in
canonical SMILES order, a GEOM reference in its own. Hydrogens are removed from both sides; stereo is
ignored by the matching (as by the graph gate).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from molgen_grpo.text import DecodeError, decode, same_graph

__all__ = ["HEADLINE_THRESHOLD", "THRESHOLDS", "aggregate", "covmat", "decode_conformer", "headline",
           "rmsd_matrix"]

THRESHOLDS = np.round(np.arange(1, 61) * 0.05, 2)  # 0.05, 0.10, ..., 3.00 Å: rounded so 0.75 is exact
HEADLINE_THRESHOLD = 0.75  # GEOM-Drugs convention (QM9 uses 0.5)
_BLOCK = re.compile(r"\[CONFORMER\](.*?)\[/CONFORMER\]", re.S)


# ---------------------------------------------------------------------- metrics (pure numpy)

def covmat(rmsd: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """COV/MAT of one molecule.

    Args:
        rmsd: ``[M, N]`` RMSD of generated ``j`` to reference ``i`` (Å); ``inf`` / NaN = failure.
        thresholds: ``[T]`` coverage thresholds (Å); coverage counts RMSD strictly below.

    Returns:
        ``cov_r [T]``, ``cov_p [T]`` (fractions), ``mat_r``, ``mat_p`` (Å, NaN without a valid
        conformer), ``valid`` (share of generated columns with a finite entry), ``n_ref``, ``n_gen``.
    """
    d = np.asarray(rmsd, dtype=float)
    if d.ndim != 2 or 0 in d.shape:
        raise ValueError(f"rmsd must be [M, N] with M, N >= 1 (references x generated), got shape {d.shape}")
    d = np.where(np.isnan(d), np.inf, d)
    t = np.asarray(thresholds, dtype=float)[:, None]
    best_ref, best_gen = d.min(axis=1), d.min(axis=0)  # [M]: nearest generated; [N]: nearest reference
    return {
        "cov_r": (best_ref[None, :] < t).mean(axis=1), "cov_p": (best_gen[None, :] < t).mean(axis=1),
        "mat_r": _finite_mean(best_ref), "mat_p": _finite_mean(best_gen),
        "valid": float(np.isfinite(d).any(axis=0).mean()), "n_ref": d.shape[0], "n_gen": d.shape[1],
    }


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and median over molecules of :func:`covmat` results.

    Returns:
        ``cov_r_mean``, ``cov_r_median``, ``cov_p_mean``, ``cov_p_median`` (``[T]``, over all
        molecules); ``mat_r_mean``, ``mat_r_median``, ``mat_p_mean``, ``mat_p_median`` (over molecules
        with a valid conformer); ``valid`` (mean share of valid conformers), ``molecules`` and
        ``molecules_without_valid``.
    """
    if not results:
        raise ValueError("aggregate needs the results of at least one molecule")
    out: dict[str, Any] = {}
    for key in ("cov_r", "cov_p"):
        stack = np.stack([r[key] for r in results])  # [molecules, T]
        out[f"{key}_mean"], out[f"{key}_median"] = stack.mean(axis=0), np.median(stack, axis=0)
    for key in ("mat_r", "mat_p"):
        values = np.array([r[key] for r in results], dtype=float)
        finite = values[np.isfinite(values)]
        out[f"{key}_mean"] = float(finite.mean()) if finite.size else float("nan")
        out[f"{key}_median"] = float(np.median(finite)) if finite.size else float("nan")
    out["valid"] = float(np.mean([r["valid"] for r in results]))
    out["molecules"] = len(results)
    out["molecules_without_valid"] = int(sum(r["valid"] == 0 for r in results))
    return out


def headline(summary: dict[str, Any], thresholds: np.ndarray = THRESHOLDS,
             at: float = HEADLINE_THRESHOLD) -> dict[str, float]:
    """Flat floats for logging: COV at threshold ``at`` (which must be on the grid), MAT, counts."""
    hits = np.flatnonzero(np.isclose(np.asarray(thresholds, dtype=float), at))
    if hits.size != 1:
        raise ValueError(f"threshold {at} is not on the grid {list(np.asarray(thresholds))}")
    k = int(hits[0])
    flat = {f"{key}_{stat}": float(summary[f"{key}_{stat}"][k]) for key in ("cov_r", "cov_p")
            for stat in ("mean", "median")}
    flat.update({f"{key}_{stat}": float(summary[f"{key}_{stat}"]) for key in ("mat_r", "mat_p")
                 for stat in ("mean", "median")})
    flat.update({key: float(summary[key]) for key in ("valid", "molecules", "molecules_without_valid")})
    return flat


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ---------------------------------------------------------------------- RDKit

def decode_conformer(text: str) -> Chem.Mol | None:
    """The generated molecule of a completion, or None when it does not decode.

    With a ``[CONFORMER]`` tag the text between it and the first ``[/CONFORMER]`` is decoded (an
    unclosed block is a failure); without one, the whole stripped text is the enriched string.
    """
    if "[CONFORMER]" in text:
        block = _BLOCK.search(text)
        if block is None:
            return None
        text = block.group(1)
    try:
        return decode(text.strip())
    except DecodeError:
        return None


def rmsd_matrix(refs: Sequence[Chem.Mol], gens: Sequence[Chem.Mol | None], symmetry: bool = True) -> np.ndarray:
    """``[M, N]`` heavy-atom RMSD (Å) of each generated conformer to each reference after alignment.

    Args:
        refs: reference molecules of one graph, each with a conformer (hydrogens allowed).
        gens: generated molecules (e.g. :func:`decode_conformer`); None marks a failed generation.
        symmetry: ``GetBestRMS`` over graph automorphisms (True) or ``AlignMol`` with one
            substructure-match atom map (False).

    Returns:
        The matrix; a column is ``inf`` for None, a graph that differs from the references' or a
        molecule without conformer, and an entry is ``inf`` where RDKit refuses the alignment.
    """
    heavy_refs = []
    for index, ref in enumerate(refs):
        if ref is None or ref.GetNumConformers() == 0:
            raise ValueError(f"reference {index} has no conformer")
        heavy_refs.append(Chem.RemoveHs(ref))
    if not heavy_refs:
        raise ValueError("rmsd_matrix needs at least one reference conformer")
    ref_smiles = Chem.MolToSmiles(heavy_refs[0])
    out = np.full((len(heavy_refs), len(gens)), np.inf)
    for j, gen in enumerate(gens):
        if gen is None or gen.GetNumConformers() == 0:
            continue
        probe = Chem.RemoveHs(gen)  # a copy: the alignments below move the probe's coordinates
        if not same_graph(Chem.MolToSmiles(probe), ref_smiles):
            continue
        for i, ref in enumerate(heavy_refs):
            out[i, j] = _rmsd(probe, ref, symmetry)
    return out


def _rmsd(probe: Chem.Mol, ref: Chem.Mol, symmetry: bool) -> float:
    try:
        if symmetry:
            return float(rdMolAlign.GetBestRMS(probe, ref))
        match = probe.GetSubstructMatch(ref)  # match[k]: the probe atom playing reference atom k
        if len(match) != ref.GetNumAtoms():
            return float("inf")
        return float(rdMolAlign.AlignMol(probe, ref, atomMap=[(p, k) for k, p in enumerate(match)]))
    except (RuntimeError, ValueError):  # RDKit's refusals (e.g. no substructure match) are failures
        return float("inf")
