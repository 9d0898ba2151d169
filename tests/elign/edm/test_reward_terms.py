import math

import numpy as np
import pytest
import torch

from elign.edm.reward_terms import (aggregate_forces, formation_energy, hard_valence_penalty, scale_force,
                                    soft_valence, transform_energy)
from elign.edm.shaping import RewardScheduler, schedule_columns
from elign.engine.errors import ConfigError


def test_force_rms_max_and_clip_hand_computed():
    forces = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]]])  # |F| = 5, 1, (padding)
    mask = torch.tensor([[True, True, False]])
    assert aggregate_forces(forces, mask, "rms", None).item() == pytest.approx(math.sqrt((25 + 1) / 2))
    assert aggregate_forces(forces, mask, "max", None).item() == pytest.approx(5.0)
    assert aggregate_forces(forces, mask, "rms", 2.0).item() == pytest.approx(math.sqrt((4 + 1) / 2))


def test_force_log_scale_hand_computed_floor_and_nan():
    force = torch.tensor([3.0, 30.0, 0.001, float("nan")], dtype=torch.float64)
    assert scale_force(force, "linear") is force
    out = scale_force(force, "log")
    assert out[:3].tolist() == pytest.approx([math.log(3.0), math.log(30.0), math.log(0.01)])
    # 3 -> 2.7 eV/Å moves the reward as much as 30 -> 27: the scale is relative
    assert (scale_force(torch.tensor([2.7]), "log") - scale_force(torch.tensor([3.0]), "log")).item() == \
        pytest.approx((scale_force(torch.tensor([27.0]), "log") - scale_force(torch.tensor([30.0]), "log")).item())
    assert math.isnan(out[3]), "a failed molecule stays NaN (the engine applies the penalty)"
    with pytest.raises(ValueError, match="linear"):
        scale_force(force, "sqrt")


def test_failed_molecule_stays_nan():
    forces = torch.full((1, 2, 3), float("nan"))
    assert torch.isnan(aggregate_forces(forces, torch.ones(1, 2, dtype=torch.bool), "rms", None)).all()


def test_formation_energy_per_atom_transform():
    energy = torch.tensor([-100.0])
    numbers = torch.tensor([[6, 1, 0]])
    mask = torch.tensor([[True, True, False]])
    e_form = formation_energy(energy, numbers, mask, {1: -10.0, 6: -80.0})
    assert e_form.item() == pytest.approx(-10.0)
    assert transform_energy(e_form, mask.sum(1), True, 1.0, 2.0, None).item() == pytest.approx((-5.0 + 1.0) / 2.0)
    assert transform_energy(e_form, mask.sum(1), False, 0.0, 1.0, 3.0).item() == pytest.approx(-3.0)
    with pytest.raises(KeyError, match="atomic number"):
        formation_energy(energy, numbers, mask, {1: -10.0})


def test_hard_valence_picks_cheaper_direction():
    # carbon with valence 3 (missing 1) and oxygen with 3 (excess 1), plus padding
    valence = np.array([[3, 3, 0]])
    z = np.array([[6, 8, 0]])
    mask = np.array([[True, True, False]])
    assert hard_valence_penalty(valence, z, mask, 2.0, 5.0)[0] == pytest.approx(2.0 + 5.0)
    assert hard_valence_penalty(valence, z, mask, 0.0, 0.0)[0] == 0.0


def test_soft_valence_of_h2_is_near_zero_and_stretched_is_missing():
    z = np.array([[1, 1]])
    mask = np.ones((1, 2), dtype=bool)
    bonded = np.array([[[0.0, 0, 0], [0.74, 0, 0]]])
    stretched = np.array([[[0.0, 0, 0], [3.0, 0, 0]]])
    missing_b, excess_b = soft_valence(bonded, z, mask, 0.02)  # sigmoid((0.84 - 0.74) / 0.02) = 0.993
    missing_s, _ = soft_valence(stretched, z, mask, 0.02)
    assert missing_b[0] < 0.05 and excess_b[0] < 0.05
    assert missing_s[0] == pytest.approx(2.0, abs=1e-3)  # each H misses one bond


def test_scheduler_uniform_adaptive_and_terminal():
    assert schedule_columns(10, 0, "uniform", 4, 3, 1, 1, 0.25, True).nonzero().squeeze(1).tolist() == [4, 7, 9]
    # adaptive on T = 20: coarse 5 while (20 - j) / 20 > 0.25, i.e. j < 15; fine 2 afterwards
    cols = schedule_columns(20, 0, "adaptive", 0, 1, 5, 2, 0.25, False).nonzero().squeeze(1).tolist()
    assert cols == [0, 5, 10, 15, 17, 19]
    # an untrained prefix is never scored
    assert schedule_columns(10, 6, "uniform", 0, 1, 1, 1, 0.25, True).nonzero().squeeze(1).tolist() == [6, 7, 8, 9]
    with pytest.raises(ConfigError, match="mode"):
        RewardScheduler("linear", 0, 1, 1, 1, 0.25, True)
