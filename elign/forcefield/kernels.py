"""Per-molecule single points for the CPU backends; what runs inside the worker processes.

Numpy in, numpy out, and no torch: these functions are pickled by reference into spawn-started
workers (:mod:`elign.forcefield._pool`), where importing torch would cost seconds and memory per
worker. Each takes a plain ``config`` dict and a list of molecules ``(Z [n] int64, R [n, 3]
float64 Å)`` and returns one ``(energy_eV, forces_eV_per_A or None, reason or None)`` tuple per
molecule. Units: tblite works in Bohr and Hartree, RDKit MMFF in Å and kcal/mol; the conversion
constants are in :mod:`elign.forcefield.units`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Iterator

import numpy as np

from elign.forcefield.units import BOHR_ANGSTROM, HARTREE_EV, KB_HARTREE_PER_K, KCAL_PER_MOL_EV

#: One molecule: atomic numbers ``[n]`` (int64) and positions ``[n, 3]`` in Å (float64).
Molecule = tuple[np.ndarray, np.ndarray]
#: One result: energy in eV (NaN on failure), forces ``[n, 3]`` in eV/Å or None, reason or None.
KernelResult = tuple[float, "np.ndarray | None", "str | None"]

#: Two atoms closer than this (Å) count as on top of each other (reason ``atoms_overlap``).
#: Exactly coincident atoms crash RDKit's extended-Hückel bond perception (segfault), and
#: fairchem's radius graph silently drops pairs closer than this (squared distance <= 1e-4 in
#: ``fairchem/core/graph/radius_graph_pbc.py``), so UMA would return a meaningless number.
SAME_ATOM_DISTANCE = 0.01


def min_pair_distance(positions: np.ndarray) -> float:
    """Smallest interatomic distance of ``positions [n, 3]`` (Å); inf for fewer than 2 atoms."""
    if len(positions) < 2:
        return math.inf
    diff = positions[:, None, :] - positions[None, :, :]
    dist2 = (diff**2).sum(-1)
    np.fill_diagonal(dist2, np.inf)
    return float(np.sqrt(dist2.min()))


def _silent(_message: str) -> None:
    """tblite logger that drops its SCF printout (the library prints through this callback)."""


# Substrings of tblite error messages -> reason codes (tblite raises TBLiteRuntimeError with a
# message; the codes are what the caller counts).
_XTB_REASONS = (
    ("scf not converged", "scf_failed"),
    ("too close", "atoms_too_close"),
    ("no support for element", "unsupported_element"),  # "No support for elements with Z >86."
    ("parameter", "unsupported_element"),
)


def _xtb_reason(message: str) -> str:
    low = message.lower()
    for needle, code in _XTB_REASONS:
        if needle in low:
            return code
    return "xtb_error"


def xtb_singlepoints(config: dict[str, Any], molecules: list[Molecule]) -> list[KernelResult]:
    """GFN-xTB energies and forces with tblite.

    ``config`` keys: ``method`` ("GFN2-xTB" | "GFN1-xTB" | "IPEA1-xTB"), ``accuracy`` (tblite
    numerical accuracy, 1.0 = default), ``max_iterations`` (SCF cycles), ``electronic_temperature``
    (K), ``charge`` (e), ``uhf`` (number of unpaired electrons).

    Reason codes: ``scf_failed``, ``atoms_too_close`` (tblite refuses the geometry),
    ``unsupported_element``, ``xtb_error`` (any other tblite error).
    """
    from tblite.exceptions import TBLiteRuntimeError, TBLiteValueError
    from tblite.interface import Calculator

    temperature_hartree = config["electronic_temperature"] * KB_HARTREE_PER_K
    out: list[KernelResult] = []
    for numbers, positions in molecules:
        try:
            calc = Calculator(
                config["method"],
                numbers,
                positions / BOHR_ANGSTROM,  # Å -> Bohr
                charge=float(config["charge"]),
                uhf=int(config["uhf"]),
                logger=_silent,
                color=False,
            )
            calc.set("verbosity", 0)
            calc.set("accuracy", float(config["accuracy"]))
            calc.set("max-iter", int(config["max_iterations"]))
            calc.set("temperature", temperature_hartree)
            res = calc.singlepoint()
            energy = float(res.get("energy")) * HARTREE_EV  # Hartree -> eV
            # gradient dE/dx in Hartree/Bohr -> force -dE/dx in eV/Å
            forces = -np.asarray(res.get("gradient"), dtype=np.float64) * (HARTREE_EV / BOHR_ANGSTROM)
        except (TBLiteRuntimeError, TBLiteValueError) as err:
            out.append((math.nan, None, _xtb_reason(str(err))))
            continue
        out.append((energy, forces, None))
    return out


#: Elements handled by MMFF here: the covalent (organic) elements MMFF94 types. MMFF's ionic
#: types (Li+, Na+, Fe2+, Zn2+, ...) cannot come out of bond perception from coordinates, and
#: the extended-Hückel code behind DetermineBonds terminates the whole process (C ``exit``)
#: for some of these elements (e.g. Zn, Xe), so they are rejected before it runs.
MMFF_ELEMENTS = frozenset({1, 6, 7, 8, 9, 14, 15, 16, 17, 35, 53})  # H C N O F Si P S Cl Br I


def mmff_singlepoints(config: dict[str, Any], molecules: list[Molecule]) -> list[KernelResult]:
    """MMFF94 / MMFF94s energies and forces with RDKit, after bond perception from coordinates.

    ``config`` keys: ``variant`` ("MMFF94" | "MMFF94s"), ``charge`` (total charge in e, used by
    bond-order perception).

    Reason codes: ``unsupported_element`` (not in :data:`MMFF_ELEMENTS`), ``atoms_overlap``
    (two atoms within :data:`SAME_ATOM_DISTANCE`), ``bond_perception_failed`` (rdDetermineBonds
    found no consistent bonding), ``sanitization_failed``, ``mmff_missing_parameters`` (an atom
    MMFF cannot type), ``mmff_setup_failed`` (no force field could be built).
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds, rdForceFieldHelpers

    # RDKit reports failures (valence errors, missing MMFF types, ...) on its C++ log as well as
    # through return values/exceptions; we report through the return values only.
    RDLogger.DisableLog("rdApp.*")
    out: list[KernelResult] = []
    for numbers, positions in molecules:
        if not MMFF_ELEMENTS.issuperset(numbers.tolist()):
            out.append((math.nan, None, "unsupported_element"))
            continue
        if min_pair_distance(positions) < SAME_ATOM_DISTANCE:
            out.append((math.nan, None, "atoms_overlap"))
            continue
        mol = _rdkit_molecule(Chem, numbers, positions)
        try:
            with _quiet_stderr():
                rdDetermineBonds.DetermineBonds(mol, charge=int(config["charge"]), useHueckel=True)
        except (ValueError, RuntimeError):
            out.append((math.nan, None, "bond_perception_failed"))
            continue
        try:
            Chem.SanitizeMol(mol)
        except (ValueError, RuntimeError):
            out.append((math.nan, None, "sanitization_failed"))
            continue
        props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol, mmffVariant=config["variant"])
        if props is None:  # RDKit returns None when an atom has no MMFF type
            out.append((math.nan, None, "mmff_missing_parameters"))
            continue
        ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(
            mol, props, confId=0, ignoreInterfragInteractions=False
        )
        if ff is None:
            out.append((math.nan, None, "mmff_setup_failed"))
            continue
        energy = float(ff.CalcEnergy()) * KCAL_PER_MOL_EV  # kcal/mol -> eV
        # CalcGrad is dE/dx in kcal/mol/Å, flattened [3n]; force = -gradient, in eV/Å
        grad = np.asarray(ff.CalcGrad(), dtype=np.float64).reshape(-1, 3)
        out.append((energy, -grad * KCAL_PER_MOL_EV, None))
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration.

    The extended-Hückel code behind ``DetermineBonds(useHueckel=True)`` (YAeHMOP) prints
    "!!! Warning !!! Distance between atoms ... is suspicious" with C stdio, which neither
    RDLogger nor ``sys.stderr`` redirection reaches. In the calling process (num_workers <= 1)
    this also hides other threads' stderr for the few milliseconds of the call.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _rdkit_molecule(Chem: Any, numbers: np.ndarray, positions: np.ndarray) -> Any:
    """An RDKit molecule with the given atoms, no bonds and one conformer (Å)."""
    rw = Chem.RWMol()
    for z in numbers:
        rw.AddAtom(Chem.Atom(int(z)))
    conf = Chem.Conformer(len(numbers))
    for i, xyz in enumerate(positions):
        conf.SetAtomPosition(i, (float(xyz[0]), float(xyz[1]), float(xyz[2])))
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()
