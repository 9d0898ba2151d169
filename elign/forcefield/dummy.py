"""A constant force field for plumbing tests: energy ``energy`` eV, zero forces, always ok.

It still goes through :class:`~elign.forcefield.base.ForceField`'s input checks, so an empty or
non-finite molecule is reported as a failure exactly as with the real backends.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from elign.forcefield.base import ForceField, Molecule, MoleculeResult


class DummyForceField(ForceField):
    """Constant energy (eV) and zero forces (eV/Å) for every molecule.

    Args:
        energy: the energy returned for every molecule, eV.
    """

    def __init__(self, energy: float = 0.0) -> None:
        self.energy = float(energy)

    def compute_molecules(self, molecules: Sequence[Molecule]) -> list[MoleculeResult]:
        """``energy`` and zero forces for each molecule."""
        return [MoleculeResult(self.energy, np.zeros((len(z), 3))) for z, _ in molecules]

    def __repr__(self) -> str:
        return f"DummyForceField(energy={self.energy})"
