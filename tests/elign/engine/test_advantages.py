import math

import pytest
import torch

from elign.engine.advantages import fed_advantages, group_normalize, pbrs_return_to_go, replace_failures


def test_group_normalize_hand_computed_with_singleton_and_all_equal_groups():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = group_normalize(values, groups, eps=1e-8)
    s = math.sqrt(2.0 / 3.0)  # population std of (1, 2, 3)
    expected = torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert torch.isfinite(adv).all()
    assert adv[3:].eq(0).all(), "all-equal and singleton groups must give exactly 0"


def test_group_normalize_all_equal_with_roundoff_is_exactly_zero():
    values = torch.full((3,), 0.1, dtype=torch.float64)  # mean(0.1,0.1,0.1) != 0.1 in binary
    assert group_normalize(values, torch.zeros(3, dtype=torch.long)).eq(0).all()


def test_group_normalize_ignores_dropped_samples():
    values = torch.tensor([1.0, 3.0, 100.0])
    keep = torch.tensor([True, True, False])
    adv = group_normalize(values, torch.zeros(3, dtype=torch.long), keep=keep, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0]))


def test_group_normalize_columns_independently():
    values = torch.tensor([[0.0, 10.0], [2.0, 10.0]])
    adv = group_normalize(values, torch.tensor([4, 4]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_pbrs_return_to_go_hand_computed():
    potentials = torch.tensor([[1.0, 2.0, 3.0]])
    terminal = torch.tensor([5.0])
    evaluated = torch.tensor([True, False, True])
    torch.testing.assert_close(pbrs_return_to_go(potentials, terminal, evaluated, 1.0),
                               torch.tensor([[4.0, 0.0, 2.0]]))
    # gamma^(T - j) with T = 3: discounts 0.125, 0.25, 0.5
    torch.testing.assert_close(pbrs_return_to_go(potentials, terminal, evaluated, 0.5),
                               torch.tensor([[0.625 - 1.0, 0.0, 2.5 - 3.0]]))


def test_fed_advantages_weights_channels_separately_and_clips():
    groups = torch.tensor([0, 0])
    force = torch.tensor([-1.0, -3.0])  # normalised: +1, -1
    energy = torch.tensor([-100.0, 100.0])  # normalised: -1, +1 (huge scale must not dominate)
    adv = fed_advantages({"force": force, "energy": energy}, {"force": 1.0, "energy": 0.1}, groups,
                         num_steps=3, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.9] * 3, [-0.9] * 3]))
    clipped = fed_advantages({"force": force}, {"force": 10.0}, groups, num_steps=1, clip=5.0, eps=0.0)
    torch.testing.assert_close(clipped, torch.tensor([[5.0], [-5.0]]))


def test_fed_advantages_shaped_channel_is_per_step():
    groups = torch.tensor([0, 0])
    returns = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0]])
    evaluated = torch.tensor([True, False, True])
    adv = fed_advantages({"energy": torch.tensor([0.0, 1.0])}, {"energy": 1.0}, groups, 3,
                         returns={"energy": returns}, evaluated=evaluated, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_replace_failures_counts_nan():
    values, n = replace_failures(torch.tensor([1.0, float("nan"), 2.0]), penalty=-5.0)
    torch.testing.assert_close(values, torch.tensor([1.0, -5.0, 2.0]))
    assert n == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_normalize_keeps_dtype(dtype):
    out = group_normalize(torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([0, 0]))
    assert out.dtype == dtype
