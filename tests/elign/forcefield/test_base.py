"""The shared contract (ForceField.__call__, ForceFieldResult), the dummy backend, the pool."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from elign.engine.errors import ConfigError
from elign.forcefield import BACKENDS, build_force_field
from elign.forcefield._pool import WorkerPool, split_chunks
from elign.forcefield.base import ForceField, MoleculeResult
from elign.forcefield.dummy import DummyForceField
from elign.forcefield.units import BOHR_ANGSTROM, HARTREE_EV, KB_HARTREE_PER_K, KCAL_PER_MOL_EV

from .molecules import WATER, embed, finite_difference_forces, pad


def test_unit_constants():
    assert HARTREE_EV == pytest.approx(27.211386, abs=1e-5)
    assert BOHR_ANGSTROM == pytest.approx(0.52917721, abs=1e-7)
    assert KCAL_PER_MOL_EV == pytest.approx(0.0433641, abs=1e-6)
    # 300 K is tblite's default electronic temperature, 9.500e-4 Hartree
    assert 300 * KB_HARTREE_PER_K == pytest.approx(9.5e-4, rel=1e-3)


def test_dummy_constant_energy_zero_forces_and_finite_difference():
    ff = DummyForceField(energy=-1.5)
    mol = embed("CCO", seed=1, noise=0.05)
    res = ff(*pad([WATER, mol], front=2))
    assert res.ok.tolist() == [True, True]
    assert res.reasons == [None, None]
    assert res.energy.tolist() == [-1.5, -1.5]
    assert res.energy.dtype == torch.float64 and res.forces.dtype == torch.float64
    assert torch.count_nonzero(res.forces) == 0
    np.testing.assert_allclose(finite_difference_forces(ff, mol, h=1e-3), 0.0)


def test_bad_inputs_are_failures_with_reasons_not_numbers():
    pos, z, mask = pad([WATER, WATER, WATER, WATER], num_atoms=4)
    mask[0] = False  # no atoms
    pos[1, 1, 0] = float("nan")  # non-finite coordinate
    z[2, 0] = 0  # Z = 0 on a real atom
    pos[:, 3] = float("nan")  # NaN / junk on padding slots is harmless
    z[:, 3] = -7
    mask[3, 2], pos[3, 2] = False, float("nan")  # a hole in the mask: row 3 keeps atoms 0, 1
    res = DummyForceField()(pos, z, mask)
    assert res.reasons == ["no_atoms", "nonfinite_positions", "invalid_atomic_number", None]
    assert res.ok.tolist() == [False, False, False, True]
    assert math.isnan(res.energy[1]) and math.isnan(res.energy[2])
    assert torch.isnan(res.forces[1, :3]).all() and torch.isnan(res.forces[2, :3]).all()
    assert res.num_failed == 3
    assert res.reason_counts() == {"no_atoms": 1, "nonfinite_positions": 1, "invalid_atomic_number": 1}


class HugeForces(ForceField):
    """A backend that reports success with whatever forces it is given (an extrapolating ML model)."""

    def __init__(self, force, **limits):
        super().__init__(**{"min_distance_angstrom": 0.5, "max_force_ev_per_angstrom": 1000.0, **limits})
        self.force = force

    def compute_molecules(self, molecules):
        return [MoleculeResult(-1.0, np.full((len(z), 3), self.force)) for z, _ in molecules]


def test_atoms_closer_than_min_distance_fail_before_the_backend_runs():
    close = (np.array([6, 1]), np.array([[0.0, 0.0, 0.0], [0.49, 0.0, 0.0]]))
    apart = (np.array([6, 1]), np.array([[0.0, 0.0, 0.0], [0.51, 0.0, 0.0]]))
    res = DummyForceField()(*pad([close, apart, WATER]))
    assert res.reasons == ["below_min_distance", None, None] and res.ok.tolist() == [False, True, True]
    assert math.isnan(res.energy[0]) and torch.isnan(res.forces[0, :2]).all()
    assert res.reason_counts() == {"below_min_distance": 1}
    assert DummyForceField(min_distance_angstrom=0.0)(*pad([close])).ok.item(), "0 switches the check off"


def test_absurd_forces_are_a_failure_for_any_backend():
    pos, z, mask = pad([WATER, WATER])
    assert HugeForces(999.0 / math.sqrt(3))(pos, z, mask).ok.all()  # |F| = 999 eV/Å: under the limit
    res = HugeForces(600.0)(pos, z, mask)  # |F| = 1039 eV/Å per atom
    assert res.reasons == ["force_too_large"] * 2 and not res.ok.any() and torch.isnan(res.energy).all()
    assert HugeForces(600.0, max_force_ev_per_angstrom=None)(pos, z, mask).ok.all(), "null switches it off"
    assert HugeForces(math.inf)(pos, z, mask).reasons == ["nonfinite_output"] * 2


@pytest.mark.parametrize("limits", [{"min_distance_angstrom": math.nan}, {"min_distance_angstrom": -1.0},
                                    {"max_force_ev_per_angstrom": math.nan}, {"max_force_ev_per_angstrom": 0.0},
                                    {"energy": math.nan}, {"energy": math.inf}])
def test_dummy_rejects_meaningless_values(limits):
    with pytest.raises(ConfigError, match=next(iter(limits))):
        DummyForceField(**limits)


def test_padding_atoms_get_zero_forces_even_for_failed_molecules():
    pos, z, mask = pad([WATER, WATER], num_atoms=5)
    pos[0, 0, 0] = float("inf")
    res = DummyForceField()(pos, z, mask)
    assert torch.isnan(res.forces[0, :3]).all()
    assert (res.forces[:, 3:] == 0).all()


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 3, 3), (2, 4), (2, 3)),  # atomic_numbers wrong N
        ((2, 3), (2, 3), (2, 3)),  # positions not [B,N,3]
        ((2, 3, 3), (2, 3), (3, 3)),  # mask wrong B
    ],
)
def test_wrong_shapes_raise(shapes):
    p, zs, ms = shapes
    with pytest.raises(ValueError):
        DummyForceField()(torch.zeros(p), torch.ones(zs, dtype=torch.long), torch.ones(ms, dtype=torch.bool))


def test_wrong_dtypes_raise():
    pos, z, mask = pad([WATER])
    with pytest.raises(ValueError, match="mask"):
        DummyForceField()(pos, z, mask.long())
    with pytest.raises(ValueError, match="atomic_numbers"):
        DummyForceField()(pos, z.double(), mask)


def test_factory_and_context_manager():
    assert set(BACKENDS) == {"xtb", "mmff", "uma", "dummy"}
    with build_force_field("dummy", energy=2.0) as ff:
        assert isinstance(ff, DummyForceField) and ff.energy == 2.0
    with pytest.raises(ConfigError, match="name"):
        build_force_field("nope")


def test_split_chunks_covers_everything_in_order():
    for n, k in [(10, 3), (3, 8), (1, 1), (256, 8)]:
        chunks = split_chunks(n, k)
        assert [i for c in chunks for i in c] == list(range(n))
        assert len(chunks) == min(n, k)
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def _crash_on_marker(config, items):
    """Kernel for the pool test: the worker process dies on a chunk containing the marker."""
    if config["marker"] in items:
        os._exit(3)
    return [(x, os.environ.get("OMP_NUM_THREADS")) for x in items]


def test_pool_single_threaded_workers_and_crash_recovery():
    pool = WorkerPool(2)
    try:
        out = pool.map_chunks(_crash_on_marker, {"marker": -1}, list(range(10)), on_crash="crashed")
        assert out == [(i, "1") for i in range(10)]  # order kept, OMP_NUM_THREADS=1 in workers
        out = pool.map_chunks(_crash_on_marker, {"marker": 0}, list(range(10)), on_crash="crashed")
        assert out[0] == "crashed"  # the chunk that killed its worker
        assert all(x == "crashed" or x[0] == i for i, x in enumerate(out))
        # the pool was rebuilt: the next call works again
        out = pool.map_chunks(_crash_on_marker, {"marker": -1}, list(range(4)), on_crash="crashed")
        assert out == [(i, "1") for i in range(4)]
    finally:
        pool.close()
