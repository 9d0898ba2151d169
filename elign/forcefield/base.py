"""The force-field interface: one batched call from padded atoms to energies and forces.

Conventions (every backend follows them):

- Input ``positions`` ``[B, N, 3]`` in Å (any float dtype, any device); ``atomic_numbers``
  ``[B, N]`` long (Z: H = 1, C = 6, ...); ``mask`` ``[B, N]`` bool, True for real atoms. Padding
  atoms (mask False) are ignored; their numbers and positions may hold anything. Real atoms need
  not be contiguous.
- Output ``energy`` ``[B]`` in eV, ``forces`` ``[B, N, 3]`` in eV/Å with the physics sign
  ``F = -dE/dx`` (a force points downhill). Both are float64, on the device of ``positions``.
  Padding atoms always get force 0.
- A molecule the backend cannot evaluate (SCF not converged, no MMFF parameters, no edges within
  the cutoff, ...) gets ``ok = False``, ``energy = NaN``, NaN forces on its real atoms and a short
  reason code in ``reasons``. There are no fallback numbers: a caller that wants a penalty must
  apply one explicitly, and can count the reasons.
- Unit conversions at each backend's boundary use the :mod:`ase.units` constants collected in
  :mod:`elign.forcefield.units` (Hartree, Bohr, kcal/mol).
- Physically impossible molecules are failures for every backend, whatever the backend says:
  two atoms closer than ``min_distance_angstrom`` are not sent to it, and a result with an atomic
  force above ``max_force_ev_per_angstrom`` is discarded. Without these, GFN2-xTB "succeeds" on two
  atoms 1e-4 Å apart with 6.7e5 eV and 6.7e9 eV/Å, a finite number that would dominate a reward.

Reason codes used by every backend (backends add their own, documented in their modules):
``"no_atoms"`` (mask all False), ``"nonfinite_positions"`` (NaN/inf coordinates),
``"invalid_atomic_number"`` (Z outside 1..118 on a real atom), ``"below_min_distance"`` (two atoms
closer than ``min_distance_angstrom``), ``"nonfinite_output"`` (the backend returned NaN/inf),
``"force_too_large"`` (an atomic force norm above ``max_force_ev_per_angstrom``),
``"worker_crashed"`` (a worker process died while evaluating the molecule).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from elign.engine.errors import check_range

# A molecule handed to a backend: (atomic numbers [n] int64, positions [n, 3] Å float64), real
# atoms only, in padded-row order. Defined in the torch-free module the worker processes import.
from elign.forcefield.kernels import Molecule, min_pair_distance

#: Default of every backend's ``min_distance_angstrom``: below the shortest real bond (H-H, 0.74 Å);
#: at 0.5 Å GFN2-xTB's forces are already 20-1800 eV/Å depending on the pair.
MIN_DISTANCE_ANGSTROM = 0.5
#: Default of every backend's ``max_force_ev_per_angstrom``: noisy QM9-size geometries stay below
#: ~50 eV/Å; beyond 1000 eV/Å (2.3e4 kcal/mol/Å) the number says nothing about the molecule.
MAX_FORCE_EV_PER_ANGSTROM = 1000.0


@dataclass
class MoleculeResult:
    """What a backend returns for one molecule.

    Attributes:
        energy: eV, or NaN when ``reason`` is set.
        forces: ``[n, 3]`` eV/Å (``-dE/dx``) for the molecule's real atoms, or None on failure.
        reason: None on success, else a short reason code such as ``"scf_failed"``.
    """

    energy: float
    forces: np.ndarray | None
    reason: str | None = None

    @classmethod
    def failed(cls, reason: str) -> "MoleculeResult":
        """A failure with NaN energy and no forces."""
        return cls(energy=math.nan, forces=None, reason=reason)


@dataclass
class ForceFieldResult:
    """Energies and forces of a padded batch.

    Attributes:
        energy: ``[B]`` float64, eV; NaN where ``ok`` is False.
        forces: ``[B, N, 3]`` float64, eV/Å, ``F = -dE/dx``; 0 on padding atoms, NaN on the real
            atoms of a molecule where ``ok`` is False.
        ok: ``[B]`` bool, True where the backend evaluated the molecule.
        reasons: ``B`` entries: None where ``ok``, else the failure's reason code.
    """

    energy: Tensor
    forces: Tensor
    ok: Tensor
    reasons: list[str | None]

    @property
    def num_failed(self) -> int:
        """Number of molecules with ``ok == False``."""
        return int((~self.ok).sum().item())

    def reason_counts(self) -> dict[str, int]:
        """How often each failure reason occurs (for logging counters)."""
        counts: dict[str, int] = {}
        for reason in self.reasons:
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
        return counts


def check_batch(positions: Tensor, atomic_numbers: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError`` unless the three tensors have the documented shapes and dtypes."""
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [B, N, 3], got {tuple(positions.shape)}")
    if not positions.is_floating_point():
        raise ValueError(f"positions must be a float tensor, got {positions.dtype}")
    bn = tuple(positions.shape[:2])
    if tuple(atomic_numbers.shape) != bn:
        raise ValueError(f"atomic_numbers must be [B, N]={bn}, got {tuple(atomic_numbers.shape)}")
    if atomic_numbers.is_floating_point() or atomic_numbers.dtype == torch.bool:
        raise ValueError(f"atomic_numbers must be an integer tensor, got {atomic_numbers.dtype}")
    if tuple(mask.shape) != bn:
        raise ValueError(f"mask must be [B, N]={bn}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


class ForceField(ABC):
    """A batched energy/force calculator (see the module docstring for units and conventions).

    Subclasses implement :meth:`compute_molecules` on unpadded numpy molecules; this class does
    the validation, unpadding and re-padding, and the physical-plausibility checks, so every
    backend handles padding, bad inputs and impossible results the same way. Subclasses call
    ``super().__init__(min_distance_angstrom=..., max_force_ev_per_angstrom=...)``. Backends that
    hold resources (worker processes) override :meth:`close`; every force field is a context
    manager (``with XTBForceField(...) as ff: ...``).
    """

    # Class-level values for a subclass that does not call __init__: the checks stay on.
    min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM
    max_force_ev_per_angstrom: float | None = MAX_FORCE_EV_PER_ANGSTROM

    def __init__(self, *, min_distance_angstrom: float, max_force_ev_per_angstrom: float | None) -> None:
        """
        Args:
            min_distance_angstrom: two atoms closer than this (Å) make the molecule a failure
                (``below_min_distance``) before the backend sees it; 0 = off.
            max_force_ev_per_angstrom: an atomic force norm above this (eV/Å) makes the molecule a
                failure (``force_too_large``); None = no limit.
        """
        self.min_distance_angstrom = check_range("min_distance_angstrom", min_distance_angstrom, 0.0)
        self.max_force_ev_per_angstrom = check_range("max_force_ev_per_angstrom", max_force_ev_per_angstrom, 0.0,
                                                     low_open=True, allow_none=True, none_means="no limit")

    def __call__(self, positions: Tensor, atomic_numbers: Tensor, mask: Tensor) -> ForceFieldResult:
        """Evaluate a padded batch.

        Args:
            positions: ``[B, N, 3]`` Å.
            atomic_numbers: ``[B, N]`` long.
            mask: ``[B, N]`` bool, True for real atoms.

        Returns:
            :class:`ForceFieldResult` on the device of ``positions`` (float64).

        Raises:
            ValueError: if the shapes or dtypes are wrong (a caller bug, not a molecule failure).
        """
        check_batch(positions, atomic_numbers, mask)
        # The backends are numpy/C libraries (or fairchem with its own batching): one transfer of
        # the whole batch to host memory, in float64 so unit conversions lose nothing.
        pos_np = positions.detach().to("cpu", torch.float64).numpy()
        z_np = atomic_numbers.detach().to("cpu", torch.int64).numpy()
        mask_np = mask.detach().to("cpu").numpy()
        b, n = mask_np.shape

        results: list[MoleculeResult | None] = [None] * b
        todo: list[int] = []
        molecules: list[Molecule] = []
        for i in range(b):
            sel = mask_np[i]
            numbers, coords = z_np[i, sel], pos_np[i, sel]
            # Inputs no backend can use are rejected here, before any backend sees them.
            if numbers.size == 0:
                results[i] = MoleculeResult.failed("no_atoms")
            elif not np.isfinite(coords).all():
                results[i] = MoleculeResult.failed("nonfinite_positions")
            elif numbers.min() < 1 or numbers.max() > 118:
                results[i] = MoleculeResult.failed("invalid_atomic_number")
            elif self.min_distance_angstrom > 0 and min_pair_distance(coords) < self.min_distance_angstrom:
                results[i] = MoleculeResult.failed("below_min_distance")
            else:
                todo.append(i)
                molecules.append((np.ascontiguousarray(numbers), np.ascontiguousarray(coords)))

        if molecules:
            computed = self.compute_molecules(molecules)
            if len(computed) != len(molecules):
                raise RuntimeError(
                    f"{type(self).__name__}.compute_molecules returned {len(computed)} results "
                    f"for {len(molecules)} molecules"
                )
            for i, res in zip(todo, computed):
                results[i] = _checked(res, int(mask_np[i].sum()), self.max_force_ev_per_angstrom)

        energy = np.full(b, np.nan)
        forces = np.zeros((b, n, 3))
        ok = np.zeros(b, dtype=bool)
        reasons: list[str | None] = []
        for i, res in enumerate(results):
            assert res is not None
            sel = mask_np[i]
            if res.reason is None:
                energy[i] = res.energy
                forces[i, sel] = res.forces
                ok[i] = True
            else:
                forces[i, sel] = np.nan
            reasons.append(res.reason)

        device = positions.device
        return ForceFieldResult(
            energy=torch.from_numpy(energy).to(device),
            forces=torch.from_numpy(forces).to(device),
            ok=torch.from_numpy(ok).to(device),
            reasons=reasons,
        )

    @abstractmethod
    def compute_molecules(self, molecules: Sequence[Molecule]) -> list[MoleculeResult]:
        """Energies (eV) and forces (eV/Å, ``-dE/dx``) of unpadded molecules, one result each.

        ``molecules`` are ``(atomic_numbers [n] int64, positions [n, 3] float64 Å)`` with
        finite coordinates and 1 <= Z <= 118. A molecule the backend cannot evaluate returns
        :meth:`MoleculeResult.failed` with a reason code; an exception here is a bug or an
        environment problem (missing library), never a per-molecule failure.
        """

    def close(self) -> None:
        """Release resources (worker processes). Idempotent; the default has nothing to release."""

    def __enter__(self) -> "ForceField":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _checked(res: MoleculeResult, num_atoms: int, max_force: float | None) -> MoleculeResult:
    """Turn a success with a wrong shape, non-finite numbers or an atomic force norm above
    ``max_force`` (eV/Å; None = no limit) into an explicit failure."""
    if res.reason is not None:
        return MoleculeResult.failed(res.reason)
    if res.forces is None or res.forces.shape != (num_atoms, 3):
        shape = None if res.forces is None else res.forces.shape
        raise RuntimeError(f"backend returned forces of shape {shape}, expected ({num_atoms}, 3)")
    if not (math.isfinite(res.energy) and np.isfinite(res.forces).all()):
        return MoleculeResult.failed("nonfinite_output")
    if max_force is not None and num_atoms and float(np.linalg.norm(res.forces, axis=1).max()) > max_force:
        return MoleculeResult.failed("force_too_large")
    return res
