"""Chemistry checks for the EDM domain: EDM bond inference, stability, RDKit SMILES and metrics.

Submodules (all CPU, numpy/RDKit only; ``geometry`` additionally uses tblite/ASE lazily):

- :mod:`elign.chem.bonds`: EDM bond-length tables and vectorised bond-order inference.
- :mod:`elign.chem.stability`: EDM atom/molecule stability, valence deviations, batched.
- :mod:`elign.chem.rdkit_mol`: RDKit molecules and canonical largest-fragment SMILES.
- :mod:`elign.chem.metrics`: validity / uniqueness / novelty, reference SMILES loader.
- :mod:`elign.chem.geometry`: SMILES -> 3D (ETKDG, MMFF, GFN2-xTB) for tests and datasets.
"""

from elign.chem.bonds import (
    ALLOWED_VALENCES,
    QM9_ATOMIC_NUMBERS,
    QM9_ELEMENTS,
    bond_order,
    infer_bond_orders,
    infer_bond_orders_batch,
)
from elign.chem.stability import (
    BatchStabilityResult,
    StabilityResult,
    check_stability,
    check_stability_batch,
    valence_gaps,
)

__all__ = [
    "ALLOWED_VALENCES",
    "QM9_ATOMIC_NUMBERS",
    "QM9_ELEMENTS",
    "BatchStabilityResult",
    "StabilityResult",
    "bond_order",
    "check_stability",
    "check_stability_batch",
    "infer_bond_orders",
    "infer_bond_orders_batch",
    "valence_gaps",
]
