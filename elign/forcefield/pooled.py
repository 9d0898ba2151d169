"""Backends whose per-molecule kernel runs in the calling process or in persistent workers."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

from elign.engine.errors import check_int
from elign.forcefield._pool import WorkerPool
from elign.forcefield.base import ForceField, Molecule, MoleculeResult

#: ``kernel(config, molecules) -> [(energy eV, forces [n, 3] eV/Å or None, reason or None)]``
Kernel = Callable[[dict[str, Any], list[Molecule]], list[tuple[float, Any, Any]]]


class PooledForceField(ForceField):
    """Shared dispatch of the xTB and MMFF backends: ``num_workers >= 2`` maps chunks of molecules
    over a :class:`WorkerPool` (a crashed worker marks its molecules ``worker_crashed``), fewer runs
    the kernel in process. Subclasses set ``config`` (sent to the kernel) and pass the kernel and
    :class:`ForceField`'s ``min_distance_angstrom`` / ``max_force_ev_per_angstrom``."""

    config: dict[str, Any]

    def __init__(self, kernel: Kernel, num_workers: int, preload: Sequence[str], *, min_distance_angstrom: float,
                 max_force_ev_per_angstrom: float | None) -> None:
        super().__init__(min_distance_angstrom=min_distance_angstrom, max_force_ev_per_angstrom=max_force_ev_per_angstrom)
        self.kernel, self.num_workers = kernel, check_int("num_workers", num_workers, 0)
        self._pool = WorkerPool(self.num_workers, preload=tuple(preload)) if self.num_workers >= 2 else None

    def in_process(self) -> contextlib.AbstractContextManager:
        """Context for the in-process kernel call (xTB limits OpenMP threads there)."""
        return contextlib.nullcontext()

    def compute_molecules(self, molecules: Sequence[Molecule]) -> list[MoleculeResult]:
        """Single points of unpadded molecules (eV, eV/Å); see :class:`ForceField`."""
        if self._pool is None:
            with self.in_process():
                raw = self.kernel(self.config, list(molecules))
        else:
            raw = self._pool.map_chunks(self.kernel, self.config, molecules,
                                        on_crash=(float("nan"), None, "worker_crashed"))
        return [MoleculeResult(energy, forces, reason) for energy, forces, reason in raw]

    def close(self) -> None:
        """Stop the worker processes (if any); a later call starts new ones."""
        if self._pool is not None:
            self._pool.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_workers={self.num_workers}, {self.config})"
