"""Isolated-atom reference energies for formation energies (``E - sum_a E_ref(Z_a)``).

    python -m elign.forcefield.references        # prints the GFN2-xTB values used in conf/reward/edm/xtb.yaml

Free atoms are computed in their ground-state spin (number of unpaired electrons below), neutral.
MMFF energies are already relative to separated atoms in their force-field sense, so the MMFF
config uses no references; for UMA give the references of your checkpoint in the reward config.
"""

from __future__ import annotations

import numpy as np

#: Unpaired electrons of the neutral free atom in its ground state (H 2S, C 3P, N 4S, O 3P, F 2P).
UNPAIRED_ELECTRONS = {1: 1, 6: 2, 7: 3, 8: 2, 9: 1}


def xtb_atom_energies(method: str = "GFN2-xTB", numbers: tuple[int, ...] = (1, 6, 7, 8, 9)) -> dict[int, float]:
    """Energy (eV) of each free atom with tblite."""
    from ase.units import Hartree
    from tblite.interface import Calculator

    out = {}
    for z in numbers:
        calc = Calculator(method, np.array([z]), np.zeros((1, 3)), charge=0, uhf=UNPAIRED_ELECTRONS[z])
        calc.set("verbosity", 0)
        out[z] = float(calc.singlepoint().get("energy")) * Hartree
    return out


if __name__ == "__main__":
    for z, e in xtb_atom_energies().items():
        print(f"  {z}: {e:.6f}")
