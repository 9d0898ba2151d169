"""A constant force field for plumbing tests: energy ``energy`` eV, zero forces.

It still goes through :class:`~elign.forcefield.base.ForceField`'s input checks, so an empty,
non-finite or collapsed molecule (atoms closer than ``min_distance_angstrom``) is reported as a
failure exactly as with the real backends.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from elign.engine.errors import check_finite
from elign.forcefield.base import MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM, ForceField, Molecule, MoleculeResult


class DummyForceField(ForceField):
    """Constant energy (eV) and zero forces (eV/Å) for every molecule.

    Args:
        energy: the energy returned for every molecule, eV.
        min_distance_angstrom, max_force_ev_per_angstrom: see :class:`~elign.forcefield.base.ForceField`.
    """

    def __init__(self, energy: float = 0.0, *, min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM,
                 max_force_ev_per_angstrom: float | None = MAX_FORCE_EV_PER_ANGSTROM) -> None:
        super().__init__(min_distance_angstrom=min_distance_angstrom, max_force_ev_per_angstrom=max_force_ev_per_angstrom)
        self.energy = check_finite("energy", energy)

    def compute_molecules(self, molecules: Sequence[Molecule]) -> list[MoleculeResult]:
        """``energy`` and zero forces for each molecule."""
        return [MoleculeResult(self.energy, np.zeros((len(z), 3))) for z, _ in molecules]

    def __repr__(self) -> str:
        return f"DummyForceField(energy={self.energy})"
