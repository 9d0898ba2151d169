"""Force fields behind one batched interface: ``ff(positions, atomic_numbers, mask) -> ForceFieldResult``.

Backends (energies in eV, forces in eV/Å = -dE/dx; see :mod:`elign.forcefield.base`):

- :class:`~elign.forcefield.xtb.XTBForceField`: GFN2-xTB via tblite, parallel worker processes.
- :class:`~elign.forcefield.mmff.MMFFForceField`: MMFF94 via RDKit with bond perception.
- :class:`~elign.forcefield.uma.UMAForceField`: fairchem UMA (named model or local checkpoint).
- :class:`~elign.forcefield.dummy.DummyForceField`: constant energy, zero forces.

Hydra configs name the classes directly (``_target_: elign.forcefield.xtb.XTBForceField``);
:func:`build_force_field` is the same by short name, for scripts.

Attributes are imported lazily: worker processes import :mod:`elign.forcefield.kernels` through
this package and must not pay for torch or fairchem.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elign.forcefield.base import ForceField, ForceFieldResult
    from elign.forcefield.dummy import DummyForceField
    from elign.forcefield.mmff import MMFFForceField
    from elign.forcefield.uma import UMAForceField, UMALoadError
    from elign.forcefield.xtb import XTBForceField

_EXPORTS = {
    "ForceField": "elign.forcefield.base",
    "ForceFieldResult": "elign.forcefield.base",
    "DummyForceField": "elign.forcefield.dummy",
    "MMFFForceField": "elign.forcefield.mmff",
    "UMAForceField": "elign.forcefield.uma",
    "UMALoadError": "elign.forcefield.uma",
    "XTBForceField": "elign.forcefield.xtb",
}

#: Short names accepted by :func:`build_force_field`.
BACKENDS = {"xtb": "XTBForceField", "mmff": "MMFFForceField", "uma": "UMAForceField", "dummy": "DummyForceField"}

__all__ = [*_EXPORTS, "BACKENDS", "build_force_field"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_force_field(name: str, **kwargs: Any) -> "ForceField":
    """Construct a backend by short name (``"xtb"``, ``"mmff"``, ``"uma"``, ``"dummy"``).

    ``kwargs`` are the class's constructor arguments. Raises ``ConfigError`` for an unknown name.
    """
    if name not in BACKENDS:
        from elign.engine.errors import ConfigError

        raise ConfigError("name", name, sorted(BACKENDS))
    return __getattr__(BACKENDS[name])(**kwargs)
