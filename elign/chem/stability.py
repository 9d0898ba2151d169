"""EDM atom and molecule stability from inferred bond orders (spec §2.4).

An atom is *stable* iff the sum of its inferred bond orders equals one of its allowed valences
(:data:`elign.chem.bonds.ALLOWED_VALENCES`); a molecule is stable iff all its atoms are. EDM's
"atom stability" metric over a set of molecules is pooled: total stable atoms / total atoms.

Besides EDM's flags we report, per atom, how far the valence is from the nearest allowed value
(``valence_missing`` = bonds to add, ``valence_excess`` = bonds to remove), which the valence penalties of
the force reward need (spec §2.1). For multi-valence elements (P {3, 5}, Hg {1, 2}, Bi {3, 5}) both
directions are available from :func:`valence_gaps` so a caller can pick the cheaper one.

Like EDM, a molecule with zero atoms counts as stable (0 stable atoms == 0 atoms); padded batches should
never contain empty molecules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from elign.chem.bonds import (
    ALLOWED_VALENCES,
    ATOMIC_NUMBERS,
    _as_numpy,
    infer_bond_orders_batch,
    to_atomic_numbers,
)

__all__ = [
    "BatchStabilityResult",
    "StabilityResult",
    "check_stability",
    "check_stability_batch",
    "valence_gaps",
]

# Allowed valences as a dense [Z, K] table (NaN-padded) so gaps are computed without Python loops.
_MAX_K = max(len(v) for v in ALLOWED_VALENCES.values())
_ALLOWED = np.full((119, _MAX_K), np.nan, dtype=np.float64)
for _sym, _vals in ALLOWED_VALENCES.items():
    _ALLOWED[ATOMIC_NUMBERS[_sym], : len(_vals)] = _vals


def valence_gaps(
    valence: np.ndarray | Any, atomic_numbers: np.ndarray | Any
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each atom's valence to the allowed valences above and below it.

    Args:
        valence: ``[...]`` summed bond orders (any integer/float array).
        atomic_numbers: same shape, atomic numbers (must have an entry in ``ALLOWED_VALENCES``;
            use 1 (H) or any valid element at padding slots and mask afterwards).

    Returns:
        ``(missing, excess)``, float64 arrays of the input shape:
        ``missing = min{a - v : a allowed, a >= v}`` (bonds to add to reach the next allowed valence) and
        ``excess = min{v - a : a allowed, a <= v}`` (bonds to remove); ``inf`` where no allowed valence
        lies in that direction. An atom is stable iff ``missing == 0`` (equivalently ``excess == 0``).
    """
    v = _as_numpy(valence).astype(np.float64)[..., None]
    z = _as_numpy(atomic_numbers).astype(np.int64)
    allowed = _ALLOWED[z]  # [..., K]
    if np.isnan(allowed[..., 0]).any():
        bad = sorted(set(z[np.isnan(allowed[..., 0])].tolist()))
        raise ValueError(f"no allowed valence known for atomic number(s) {bad}")
    up = np.where(allowed >= v, allowed - v, np.inf)  # NaN >= v is False -> inf
    down = np.where(allowed <= v, v - allowed, np.inf)
    return up.min(axis=-1), down.min(axis=-1)


def _nearest_deviation(missing: np.ndarray, excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deviation from the nearest allowed valence as (missing, excess) ints, the other one zero.

    Ties (only possible for multi-valence elements, e.g. P with 4 bonds) count as excess over the lower
    valence, the element's default oxidation state in EDM's lists.
    """
    use_missing = missing < excess
    miss = np.where(use_missing, missing, 0.0)
    exc = np.where(use_missing, 0.0, excess)
    return miss.astype(np.int64), exc.astype(np.int64)


@dataclass(frozen=True)
class StabilityResult:
    """Stability of one molecule with ``N`` atoms.

    Attributes:
        molecule_stable: all atoms stable.
        num_stable_atoms: number of stable atoms.
        num_atoms: ``N``.
        atom_stable: ``[N]`` bool.
        valence: ``[N]`` int, summed inferred bond order per atom.
        valence_missing: ``[N]`` int, bonds missing to the nearest allowed valence (0 if at/above it).
        valence_excess: ``[N]`` int, bonds in excess of the nearest allowed valence.
        bond_orders: ``[N, N]`` int inferred bond-order matrix (reuse it to build the RDKit molecule).
    """

    molecule_stable: bool
    num_stable_atoms: int
    num_atoms: int
    atom_stable: np.ndarray
    valence: np.ndarray
    valence_missing: np.ndarray
    valence_excess: np.ndarray
    bond_orders: np.ndarray

    @property
    def atom_stability(self) -> float:
        """Fraction of stable atoms (1.0 for an empty molecule, consistent with ``molecule_stable``)."""
        return self.num_stable_atoms / self.num_atoms if self.num_atoms else 1.0


@dataclass(frozen=True)
class BatchStabilityResult:
    """Stability of a padded batch of ``B`` molecules with up to ``N`` atoms.

    Per-atom arrays are ``[B, N]`` and are False/0 at padding slots; ``bond_orders`` is ``[B, N, N]``.
    """

    molecule_stable: np.ndarray
    num_stable_atoms: np.ndarray
    num_atoms: np.ndarray
    atom_stable: np.ndarray
    valence: np.ndarray
    valence_missing: np.ndarray
    valence_excess: np.ndarray
    bond_orders: np.ndarray
    mask: np.ndarray

    @property
    def molecule_stability(self) -> float:
        """Fraction of stable molecules (EDM ``mol_stable``); 0.0 for an empty batch."""
        return float(self.molecule_stable.mean()) if self.molecule_stable.size else 0.0

    @property
    def atom_stability(self) -> float:
        """Pooled fraction of stable atoms over the batch (EDM ``atm_stable``); 0.0 if no atoms."""
        total = int(self.num_atoms.sum())
        return int(self.num_stable_atoms.sum()) / total if total else 0.0

    @property
    def atom_stability_per_molecule(self) -> np.ndarray:
        """``[B]`` per-molecule fraction of stable atoms (reward term ``a``, spec §2.1)."""
        return self.num_stable_atoms / np.maximum(self.num_atoms, 1)

    def molecule(self, i: int) -> StabilityResult:
        """Unpadded :class:`StabilityResult` of molecule ``i``."""
        idx = np.flatnonzero(self.mask[i])
        return StabilityResult(
            molecule_stable=bool(self.molecule_stable[i]),
            num_stable_atoms=int(self.num_stable_atoms[i]),
            num_atoms=int(self.num_atoms[i]),
            atom_stable=self.atom_stable[i, idx],
            valence=self.valence[i, idx],
            valence_missing=self.valence_missing[i, idx],
            valence_excess=self.valence_excess[i, idx],
            bond_orders=self.bond_orders[i][np.ix_(idx, idx)],
        )


def check_stability_batch(
    positions: np.ndarray | Any,
    atomic_numbers: np.ndarray | Any,
    mask: np.ndarray | Any | None = None,
    bond_orders: np.ndarray | Any | None = None,
    check_exists: bool = False,
) -> BatchStabilityResult:
    """EDM stability for a padded batch.

    Args:
        positions: ``[B, N, 3]`` coordinates in Å (numpy or torch).
        atomic_numbers: ``[B, N]`` atomic numbers (anything at padding slots).
        mask: ``[B, N]`` True for real atoms; ``None`` = all real.
        bond_orders: optional precomputed ``[B, N, N]`` bond orders (skips inference).
        check_exists: treat element pairs without a tabulated length as unbonded instead of raising.
    """
    z = _as_numpy(atomic_numbers).astype(np.int64)
    m = np.ones(z.shape, dtype=bool) if mask is None else _as_numpy(mask).astype(bool)
    if bond_orders is None:
        orders = infer_bond_orders_batch(positions, z, m, check_exists=check_exists)
    else:
        orders = _as_numpy(bond_orders).astype(np.int64) * (m[:, :, None] & m[:, None, :])
    valence = orders.sum(axis=-1)
    z_safe = np.where(m, z, 1)  # padding gets a harmless element; masked out below
    missing, excess = valence_gaps(valence, z_safe)
    atom_stable = (missing == 0) & m
    miss, exc = _nearest_deviation(missing, excess)
    num_atoms = m.sum(axis=-1)
    num_stable = atom_stable.sum(axis=-1)
    return BatchStabilityResult(
        molecule_stable=num_stable == num_atoms,
        num_stable_atoms=num_stable,
        num_atoms=num_atoms,
        atom_stable=atom_stable,
        valence=np.where(m, valence, 0),
        valence_missing=np.where(m, miss, 0),
        valence_excess=np.where(m, exc, 0),
        bond_orders=orders,
        mask=m,
    )


def check_stability(
    positions: np.ndarray | Any,
    elements: Sequence[str | int] | np.ndarray | Any,
    bond_orders: np.ndarray | Any | None = None,
    check_exists: bool = False,
) -> StabilityResult:
    """EDM ``check_stability`` for one molecule.

    Args:
        positions: ``[N, 3]`` coordinates in Å.
        elements: ``N`` element symbols or atomic numbers.
        bond_orders: optional precomputed ``[N, N]`` bond orders.
        check_exists: see :func:`check_stability_batch`.
    """
    pos = _as_numpy(positions)
    if pos.ndim != 2 or pos.shape[-1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {pos.shape}")
    z = to_atomic_numbers(elements)
    if z.shape != (pos.shape[0],):
        raise ValueError(f"{z.size} elements for {pos.shape[0]} positions")
    orders = None if bond_orders is None else _as_numpy(bond_orders)[None]
    return check_stability_batch(pos[None], z[None], None, orders, check_exists).molecule(0)


def count_fragments(bond_orders: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Connected components of each molecule's inferred bond graph.

    A diffusion sample can split into pieces (or shed single atoms) that each look chemically fine,
    so validity of the largest fragment alone hides it; report this next to it.

    Args:
        bond_orders: ``[B, N, N]`` inferred bond orders (0 = no bond).
        mask: ``[B, N]`` bool, real atoms.
    Returns:
        ``[B]`` int, fragments per molecule (0 for an empty one).
    """
    b, n = mask.shape
    adjacency = (bond_orders > 0) & mask[:, :, None] & mask[:, None, :]
    labels = np.broadcast_to(np.arange(n), (b, n)).copy()
    for _ in range(n):  # min-label propagation: the diameter of a graph on n nodes is < n
        neighbour_min = np.where(adjacency, labels[:, None, :], n).min(axis=2)
        new = np.minimum(labels, neighbour_min)
        if np.array_equal(new, labels):
            break
        labels = new
    return ((labels == np.arange(n)) & mask).sum(axis=1)
