"""GFN2-xTB through tblite: units, forces = -dE/dx, batching, failures, worker processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elign.engine.errors import ConfigError
from elign.forcefield.units import HARTREE_EV
from elign.forcefield.xtb import XTBForceField

from .molecules import WATER, embed, finite_difference_forces, pad

SETTINGS = dict(method="GFN2-xTB", accuracy=0.01, max_iterations=250, electronic_temperature=300.0)


@pytest.fixture(scope="module")
def xtb():
    with XTBForceField(num_workers=1, **SETTINGS) as ff:
        yield ff


@pytest.fixture(scope="module")
def batch():
    mols = [WATER, embed("CO", seed=1, noise=0.05), embed("CCO", seed=2, noise=0.05), embed("CC(=O)N", seed=3, noise=0.05)]
    return mols, pad(mols, front=1)


def test_water_energy_in_ev(xtb):
    res = xtb(*pad([WATER]))
    assert res.ok.item()
    # GFN2-xTB total energy of water near equilibrium: -5.070 Hartree = -137.97 eV
    assert res.energy.item() / HARTREE_EV == pytest.approx(-5.07, abs=0.01)
    assert res.energy.item() == pytest.approx(-137.9, abs=0.3)


def test_forces_are_minus_energy_gradient(xtb):
    mol = embed("CCO", seed=0, noise=0.05)  # ethanol, displaced so forces are not ~0
    forces = xtb(*pad([mol])).forces[0].numpy()
    assert np.abs(forces).max() > 0.1  # eV/Å: a real test, not 0 == 0
    np.testing.assert_allclose(forces, finite_difference_forces(xtb, mol, h=1e-3), atol=2e-3)


def test_padded_batch_equals_one_at_a_time(xtb, batch):
    mols, (pos, z, mask) = batch
    res = xtb(pos.float(), z, mask)  # float32 input is accepted too
    assert res.ok.all()
    assert (res.forces[~mask] == 0).all()
    for i, mol in enumerate(mols):
        single = xtb(*pad([mol]))
        np.testing.assert_allclose(res.energy[i].item(), single.energy.item(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(res.forces[i][mask[i]].numpy(), single.forces[0].numpy(), atol=1e-4)


def test_two_workers_equal_one(xtb, batch):
    _, (pos, z, mask) = batch
    reference = xtb(pos, z, mask)
    with XTBForceField(num_workers=2, **SETTINGS) as ff2:
        res = ff2(pos, z, mask)
        again = ff2(pos, z, mask)  # the pool persists between calls
    torch.testing.assert_close(res.energy, reference.energy, rtol=0, atol=1e-8)
    torch.testing.assert_close(res.forces, reference.forces, rtol=0, atol=1e-7)
    torch.testing.assert_close(again.forces, res.forces, rtol=0, atol=0)


def test_overlapping_atoms_fail_without_numbers(xtb, batch):
    mols, _ = batch
    bad = (mols[2][0], mols[2][1].copy())
    bad[1][1] = bad[1][0]  # two atoms on top of each other
    pos, z, mask = pad([mols[1], bad, mols[3]], front=1)
    with XTBForceField(num_workers=0, **SETTINGS, min_distance_angstrom=0.0) as unchecked:
        assert unchecked(pos, z, mask).reasons == [None, "atoms_too_close", None]  # tblite's own refusal
    res = xtb(pos, z, mask)
    assert res.ok.tolist() == [True, False, True]
    assert res.reasons == [None, "below_min_distance", None]  # the shared check comes first
    assert math.isnan(res.energy[1].item())
    assert torch.isnan(res.forces[1][mask[1]]).all() and (res.forces[1][~mask[1]] == 0).all()
    # the good neighbours are unaffected
    assert res.energy[0].item() == pytest.approx(xtb(*pad([mols[1]])).energy.item(), abs=1e-5)


@pytest.mark.parametrize("limits,reason", [
    ({}, "below_min_distance"),
    ({"min_distance_angstrom": 0.0}, "force_too_large"),  # the force limit alone catches it too
])
def test_atoms_1e_4_angstrom_apart_are_a_failure_not_a_number(limits, reason):
    """tblite "succeeds" here: 6.7e5 eV and 6.7e9 eV/Å, finite numbers that became rewards."""
    ch = (np.array([6, 1]), np.array([[0.0, 0.0, 0.0], [1e-4, 0.0, 0.0]]))
    with XTBForceField(num_workers=0, **SETTINGS, **limits) as ff:
        res = ff(*pad([WATER, ch]))
    assert res.ok.tolist() == [True, False] and res.reasons == [None, reason]
    assert math.isnan(res.energy[1].item()) and torch.isnan(res.forces[1, :2]).all()
    with XTBForceField(num_workers=0, **SETTINGS, min_distance_angstrom=0.0, max_force_ev_per_angstrom=None) as off:
        raw = off(*pad([ch]))
    assert raw.ok.item() and raw.forces.norm(dim=-1).max() > 1e9  # what tblite returns with both checks off


def test_unsupported_element_is_reported(xtb):
    francium_hydride = (np.array([87, 1]), np.array([[0.0, 0.0, 0.0], [2.3, 0.0, 0.0]]))
    res = xtb(*pad([WATER, francium_hydride]))
    assert res.reasons == [None, "unsupported_element"]


def test_scf_failure_is_reported():
    with XTBForceField(num_workers=0, method="GFN2-xTB", accuracy=1.0, max_iterations=2, electronic_temperature=300.0) as ff:
        res = ff(*pad([WATER]))
    assert res.reasons == ["scf_failed"] and not res.ok.item() and math.isnan(res.energy.item())


@pytest.mark.parametrize(
    "key,value",
    [("method", "GFN3"), ("num_workers", -1), ("accuracy", 0.0), ("max_iterations", 0), ("electronic_temperature", -1.0),
     ("accuracy", math.nan), ("max_iterations", math.nan), ("electronic_temperature", math.inf), ("charge", math.nan),
     ("uhf", 0.5), ("num_workers", math.nan), ("min_distance_angstrom", -0.1), ("min_distance_angstrom", math.nan),
     ("max_force_ev_per_angstrom", 0.0), ("max_force_ev_per_angstrom", math.inf)],
)
def test_bad_config_names_the_key(key, value):
    kwargs = dict(num_workers=0, **SETTINGS)
    kwargs[key] = value
    with pytest.raises(ConfigError, match=key):
        XTBForceField(**kwargs)
