"""MMFF94 energies and forces through RDKit, with bond perception from the coordinates.

Generated molecules come as atoms + coordinates only, so each molecule is first given bonds and
bond orders by ``rdDetermineBonds.DetermineBonds(mol, charge=..., useHueckel=True)`` (connectivity
from an extended-Hückel calculation, which is more robust than distance rules on distorted
geometries), sanitised, typed with MMFF94 (or MMFF94s) and evaluated: the energy comes back in
kcal/mol (× ``KCAL_PER_MOL_EV`` → eV) and the gradient in kcal/mol/Å (× ``-KCAL_PER_MOL_EV`` →
force in eV/Å). Interactions between disconnected fragments are kept (RDKit's default drops
them), so fragments that overlap are still pushed apart.

Only H, C, N, O, F, Si, P, S, Cl, Br and I are accepted (others: ``unsupported_element``; see
:data:`elign.forcefield.kernels.MMFF_ELEMENTS`). MMFF fails often on noisy geometries; such
molecules get ``ok = False`` with the reason code ``atoms_overlap`` (two atoms within 0.01 Å:
checked first, because exactly coincident atoms crash the Hückel code), ``bond_perception_failed``, ``sanitization_failed``, ``mmff_missing_parameters`` (an element or
environment MMFF cannot type) or ``mmff_setup_failed``. RDKit's C++ log is silenced in the
process that runs the calculation.

Parallelism is the same as :mod:`elign.forcefield.xtb`: ``num_workers >= 2`` persistent
single-threaded spawn processes, 0 or 1 in the calling process.
"""

from __future__ import annotations

from elign.engine.errors import ConfigError, check_int
from elign.forcefield.base import MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM
from elign.forcefield.pooled import PooledForceField
from elign.forcefield.kernels import mmff_singlepoints

MMFF_VARIANTS = ("MMFF94", "MMFF94s")


class MMFFForceField(PooledForceField):
    """RDKit MMFF94 single points for a padded batch; see the module docstring.

    Args:
        variant: "MMFF94" (default) or "MMFF94s".
        charge: total charge of every molecule, e (used by bond-order perception).
        num_workers: worker processes; 0 or 1 = in the calling process.
        min_distance_angstrom, max_force_ev_per_angstrom: see :class:`~elign.forcefield.base.ForceField`.
    """

    def __init__(self, *, variant: str = "MMFF94", charge: int = 0, num_workers: int = 0,
                 min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM,
                 max_force_ev_per_angstrom: float | None = MAX_FORCE_EV_PER_ANGSTROM) -> None:
        if variant not in MMFF_VARIANTS:
            raise ConfigError("variant", variant, MMFF_VARIANTS)
        self.config = {"variant": variant, "charge": check_int("charge", charge)}
        super().__init__(mmff_singlepoints, num_workers, preload=("rdkit.Chem.rdDetermineBonds",),
                         min_distance_angstrom=min_distance_angstrom, max_force_ev_per_angstrom=max_force_ev_per_angstrom)
