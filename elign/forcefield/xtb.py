"""GFN-xTB energies and forces through tblite, in parallel worker processes.

tblite (the reference GFN-xTB library) works in atomic units: positions are sent in Bohr
(Å / ``BOHR_ANGSTROM``), the energy comes back in Hartree (× ``HARTREE_EV`` → eV) and the
gradient in Hartree/Bohr (× ``-HARTREE_EV / BOHR_ANGSTROM`` → force in eV/Å). The electronic
temperature is configured in Kelvin and converted to Hartree (× k_B in Hartree/K). All constants
are :mod:`ase.units` values (:mod:`elign.forcefield.units`).

Each molecule gets a fresh calculator (composition changes from molecule to molecule), SCF
printout is silenced (verbosity 0 and a no-op logger). A molecule whose SCF does not converge,
or that tblite refuses (atoms too close, unsupported element), gets ``ok = False`` with the
reason code ``scf_failed`` / ``atoms_too_close`` / ``unsupported_element`` / ``xtb_error``.

Parallelism: ``num_workers >= 2`` starts that many single-threaded spawn processes (on first
use; they persist until :meth:`XTBForceField.close`). ``num_workers`` 0 or 1 runs in the calling
process, also with one OpenMP thread (see :func:`_one_openmp_thread`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from elign.engine.errors import ConfigError, check_int, check_range
from elign.forcefield.base import MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM
from elign.forcefield.pooled import PooledForceField
from elign.forcefield.kernels import xtb_singlepoints

#: Methods tblite ships parameters for.
XTB_METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")


class XTBForceField(PooledForceField):
    """GFN-xTB (tblite) single points for a padded batch; see the module docstring.

    All arguments are keyword-only (they map one-to-one onto the Hydra config keys).

    Args:
        num_workers: worker processes; 0 or 1 = in the calling process.
        method: "GFN2-xTB" (default), "GFN1-xTB" or "IPEA1-xTB".
        accuracy: tblite numerical accuracy (1.0 = tblite default; smaller is tighter).
        max_iterations: maximum SCF cycles before the molecule counts as ``scf_failed``.
        electronic_temperature: Fermi smearing temperature, K (xtb's default is 300 K).
        charge: total charge of every molecule, e.
        uhf: number of unpaired electrons of every molecule.
        min_distance_angstrom: closer atoms make a molecule a failure before tblite sees it
            (tblite itself only refuses near-coincident atoms and returns absurd numbers above that).
        max_force_ev_per_angstrom: a larger atomic force makes the molecule a failure; None = no limit.
    """

    def __init__(
        self,
        *,
        num_workers: int,
        method: str = "GFN2-xTB",
        accuracy: float,
        max_iterations: int,
        electronic_temperature: float,
        charge: int = 0,
        uhf: int = 0,
        min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM,
        max_force_ev_per_angstrom: float | None = MAX_FORCE_EV_PER_ANGSTROM,
    ) -> None:
        if method not in XTB_METHODS:
            raise ConfigError("method", method, XTB_METHODS)
        # Plain dict: this is what is pickled to the workers with every chunk.
        self.config = {
            "method": method,
            "accuracy": check_range("accuracy", accuracy, 0.0, low_open=True),
            "max_iterations": check_int("max_iterations", max_iterations, 1),
            "electronic_temperature": check_range("electronic_temperature", electronic_temperature, 0.0),
            "charge": check_int("charge", charge),
            "uhf": check_int("uhf", uhf, 0),
        }
        super().__init__(xtb_singlepoints, num_workers, preload=("tblite.interface",),
                         min_distance_angstrom=min_distance_angstrom, max_force_ev_per_angstrom=max_force_ev_per_angstrom)

    def in_process(self) -> contextlib.AbstractContextManager:
        return _one_openmp_thread()


@contextlib.contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """Run tblite in this process with one OpenMP thread, then restore torch's thread count.

    torch bundles libgomp and tblite links against the same soname, so both use one OpenMP
    runtime in this process, and ``torch.set_num_threads`` is the portable way to set its
    thread count. One thread: parallelism over molecules comes from the workers, and threads
    inside one small-molecule SCF are at best a wash and, when the cores are busy, much slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
