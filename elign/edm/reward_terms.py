"""Reward terms of the ELIGN force-field reward (spec elign.md §2.1) as pure functions.

Shapes: ``B`` molecules padded to ``N`` atoms; ``mask`` ``[B, N]`` bool marks real atoms.
Units: Å, eV, eV/Å. Every function is NaN-transparent: a NaN input (a failed force-field
evaluation) gives a NaN output for that molecule, never a silent 0.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from elign.chem.bonds import threshold_tables_angstrom
from elign.chem.stability import valence_gaps
from elign.engine.errors import check_finite, check_int

FORCE_AGGREGATIONS = ("rms", "max")
FORCE_SCALES = ("linear", "log")
FORCE_LOG_FLOOR_EV_PER_ANGSTROM = 0.01  # log scale: forces below this count as this (a relaxed molecule is ~0.05)


def check_atom_refs(atom_refs_ev: Mapping[int, float] | None, key: str = "atom_refs_ev") -> dict[int, float] | None:
    """``{Z: E_ref}`` with integer atomic numbers in 1..118 and finite energies (eV), else a
    :class:`~elign.engine.errors.ConfigError` naming ``<key>.<Z>``; None stays None (total energies)."""
    if atom_refs_ev is None:
        return None
    return {check_int(f"{key}.{z}", z, 1, 118): check_finite(f"{key}.{z}", e) for z, e in dict(atom_refs_ev).items()}


def aggregate_forces(forces: Tensor, mask: Tensor, mode: str, clip_ev_per_angstrom: float | None) -> Tensor:
    """Force metric per molecule: RMS (``sqrt(mean_a |F_a|^2)``) or max of the per-atom norms.

    Args:
        forces: ``[B, N, 3]`` eV/Å (NaN rows for failed molecules).
        mask: ``[B, N]`` bool.
        mode: "rms" or "max".
        clip_ev_per_angstrom: per-atom norm clip ``F_a * min(1, c / |F_a|)`` before aggregating.
    Returns:
        ``[B]`` eV/Å.
    """
    norms = forces.norm(dim=-1)  # [B, N]
    if clip_ev_per_angstrom is not None:
        norms = norms.clamp(max=clip_ev_per_angstrom)
    m = mask.to(norms.dtype)
    count = m.sum(dim=1).clamp(min=1)
    norms = torch.where(mask, norms, torch.zeros_like(norms))
    if mode == "rms":
        return torch.sqrt((norms**2).sum(dim=1) / count)
    if mode == "max":
        return norms.max(dim=1).values
    raise ValueError(f"force aggregation must be one of {FORCE_AGGREGATIONS}, got {mode!r}")


def scale_force(force: Tensor, scale: str) -> Tensor:
    """The force metric on the scale the reward uses: ``m`` (linear) or ``ln(max(m, floor) / 1 eV/Å)`` (log).

    Why log: a group's advantages are normalised by its standard deviation, and one exploded sample
    (30-500 eV/Å) among ordinary ones (~3 eV/Å) sets that deviation, so the ordinary molecules'
    advantages are nearly equal. On the log scale 3 -> 2.7 eV/Å moves the reward as much as
    30 -> 27, so the ranking of ordinary molecules still counts.

    Args:
        force: ``[B]`` eV/Å, NaN for failed molecules (stays NaN).
        scale: "linear" or "log".
    Returns:
        ``[B]``, same dtype.
    """
    if scale == "linear":
        return force
    if scale == "log":
        return torch.log(force.clamp(min=FORCE_LOG_FLOOR_EV_PER_ANGSTROM))  # clamp keeps NaN
    raise ValueError(f"force scale must be one of {FORCE_SCALES}, got {scale!r}")


def formation_energy(energy: Tensor, atomic_numbers: Tensor, mask: Tensor, atom_refs: dict[int, float] | None) -> Tensor:
    """``E - sum_a E_ref(Z_a)`` in eV (total energy if ``atom_refs`` is None).

    Total energies grow with the number and weight of atoms, so rewarding them favours heavy
    compositions (an ELIGN default-config flaw); references remove that bias.
    """
    if atom_refs is None:
        return energy
    table = torch.zeros(119, dtype=energy.dtype, device=energy.device)
    for z, e in atom_refs.items():
        table[int(z)] = float(e)
    present = torch.unique(atomic_numbers[mask]).tolist()
    missing = [z for z in present if int(z) not in atom_refs]
    if missing:
        raise KeyError(f"no reference energy for atomic number(s) {missing}; atom_refs has {sorted(atom_refs)}")
    refs = (table[atomic_numbers.clamp(0, 118)] * mask.to(energy.dtype)).sum(dim=1)
    return energy - refs


def transform_energy(energy: Tensor, num_atoms: Tensor, per_atom: bool, offset_ev: float, scale_ev: float,
                     clip: float | None) -> Tensor:
    """``E~ = (E [/ n] + offset) / scale``, optionally clamped to ``[-clip, clip]``. ``[B]`` -> ``[B]``."""
    e = energy / num_atoms.clamp(min=1).to(energy.dtype) if per_atom else energy
    e = (e + offset_ev) / scale_ev
    return e.clamp(-clip, clip) if clip is not None else e


def hard_valence_penalty(valence: np.ndarray, atomic_numbers: np.ndarray, mask: np.ndarray,
                         underbond_weight: float, overbond_weight: float) -> np.ndarray:
    """``sum_a min(w_u * missing_a, w_o * excess_a)``: for each atom the cheaper way to an allowed
    valence (multi-valence elements can be fixed in either direction). ``[B, N]`` -> ``[B]``."""
    z = np.where(mask, atomic_numbers, 1)
    missing, excess = valence_gaps(valence, z)
    # inf = "no allowed valence in that direction": never the cheaper way, even at weight 0.
    cost_missing = np.where(np.isfinite(missing), underbond_weight * np.nan_to_num(missing, posinf=0.0), np.inf)
    cost_excess = np.where(np.isfinite(excess), overbond_weight * np.nan_to_num(excess, posinf=0.0), np.inf)
    return np.where(mask, np.minimum(cost_missing, cost_excess), 0.0).sum(axis=1)


def soft_valence(positions: np.ndarray, atomic_numbers: np.ndarray, mask: np.ndarray,
                 temperature_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Differentiable-style valence: bond order ``sum_k sigmoid((thr_k - d) / tau)`` over the single,
    double and triple thresholds (table length + margin), summed per atom; then the distance to
    the nearest allowed valence below (excess) and above (missing), summed per molecule.

    Args:
        positions: ``[B, N, 3]`` Å; atomic_numbers ``[B, N]``; mask ``[B, N]``.
        temperature_angstrom: sigmoid width tau.
    Returns:
        ``(missing [B], excess [B])`` in bond-order units.
    """
    z = np.where(mask, atomic_numbers, 1).astype(np.int64)
    d = np.linalg.norm(positions[:, :, None, :] - positions[:, None, :, :], axis=-1)  # [B, N, N]
    pair = mask[:, :, None] & mask[:, None, :] & ~np.eye(mask.shape[1], dtype=bool)[None]
    order = np.zeros_like(d)
    for table in threshold_tables_angstrom():
        thr = table[z[:, :, None], z[:, None, :]]
        ok = pair & np.isfinite(thr)
        with np.errstate(over="ignore"):
            order += np.where(ok, 1.0 / (1.0 + np.exp(-(np.nan_to_num(thr) - d) / temperature_angstrom)), 0.0)
    valence = order.sum(axis=2)  # [B, N]
    missing, excess = valence_gaps(valence, z)
    near_missing = np.where(missing <= excess, missing, 0.0)
    near_excess = np.where(missing <= excess, 0.0, excess)
    return (np.where(mask, near_missing, 0.0).sum(axis=1), np.where(mask, near_excess, 0.0).sum(axis=1))
