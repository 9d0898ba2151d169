"""Session fixture of the chemistry tests: xTB-relaxed 3D geometries of the fixed QM9 sample."""

from __future__ import annotations

import time

import pytest

from .chem_testdata import QM9_SAMPLE


@pytest.fixture(scope="session")
def qm9_geometries():
    """GFN2-xTB relaxed geometries (ETKDG seed 0 -> MMFF -> L-BFGS to 0.05 eV/Å) of ``QM9_SAMPLE``.

    Returns ``(molecules, seconds_per_molecule)``; built once per session (~10 s on one core).
    """
    pytest.importorskip("tblite")
    from elign.chem.geometry import embed_many

    # One spawned worker with one OpenMP thread: the machine is shared, and multi-threaded xTB on
    # ~17-atom molecules is several times slower under load (see elign.chem.geometry).
    t0 = time.perf_counter()
    mols = embed_many(QM9_SAMPLE, seed=0, relax="xtb", workers=1, omp_threads=1)
    per_mol = (time.perf_counter() - t0) / len(mols)
    assert all(m is not None for m in mols), "ETKDG failed on a sample molecule"
    return mols, per_mol
