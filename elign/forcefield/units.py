"""Unit constants of the force-field package (from :mod:`ase.units`, CODATA 2014).

Kept free of torch so that the worker processes (:mod:`elign.forcefield.kernels`) can import it.
All public results are in eV (energy) and eV/Å (forces); backends convert at their boundary.
"""

from __future__ import annotations

from ase import units as _ase

#: 1 Hartree in eV (27.211386...).
HARTREE_EV: float = float(_ase.Hartree)
#: 1 Bohr in Å (0.52917721...).
BOHR_ANGSTROM: float = float(_ase.Bohr)
#: 1 kcal/mol in eV (0.0433641...).
KCAL_PER_MOL_EV: float = float(_ase.kcal / _ase.mol)
#: Boltzmann constant in Hartree/K (3.1668e-6); tblite takes the electronic temperature in Hartree.
KB_HARTREE_PER_K: float = float(_ase.kB / _ase.Hartree)
