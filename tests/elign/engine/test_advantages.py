import math

import pytest
import torch

from elign.engine.advantages import (
    fed_advantages,
    grpo_advantages,
    group_normalize,
    nan_moments,
    nan_weighted_sum,
    normalize_then_sum,
    pbrs_return_to_go,
    replace_failures,
    sum_then_normalize,
)


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


# --- TRL's GRPO advantages -------------------------------------------------------------------

NAN = math.nan
EPS = 1e-4


def one(values):
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)  # [B, 1]: one reward function


def test_grpo_group_scaling_hand_computed_with_singleton_all_equal_and_nan():
    rewards = one([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, 1.0, NAN, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    adv = grpo_advantages(rewards, torch.ones(1), groups)
    # group 0: mean 2, Bessel std 1; group 3 skips the NaN: mean 2, std sqrt(2); the NaN row gets 0
    a, b = 1 / (1 + EPS), 1 / (math.sqrt(2) + EPS)
    expected = torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0, -b, 0.0, b], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=0)
    assert adv[3:6].eq(0).all(), "all-equal and singleton groups give exactly 0"


def test_grpo_all_equal_group_with_roundoff_is_exactly_zero():
    adv = grpo_advantages(one([0.1, 0.1, 0.1]), torch.ones(1), torch.zeros(3, dtype=torch.long))
    assert adv.eq(0).all()  # TRL's (r - mean) / (0 + 1e-4) leaves ~1e-13 here


@pytest.mark.parametrize("scale, expected", [
    ("group", [-1 / (math.sqrt(2) + EPS), 1 / (math.sqrt(2) + EPS), -2 / (math.sqrt(8) + EPS), 2 / (math.sqrt(8) + EPS)]),
    # batch: group means (1, 12) are the baseline; std of (0, 2, 10, 14) with Bessel is sqrt(131 / 3)
    ("batch", [c / (math.sqrt(131 / 3) + EPS) for c in (-1.0, 1.0, -2.0, 2.0)]),
    ("none", [-1.0, 1.0, -2.0, 2.0]),
])
def test_grpo_scale_rewards_hand_computed(scale, expected):
    rewards = one([0.0, 2.0, 10.0, 14.0])
    adv = grpo_advantages(rewards, torch.ones(1), torch.tensor([7, 7, 3, 3]), scale_rewards=scale)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_grpo_std_eps_is_configurable():
    adv = grpo_advantages(one([1.0, 3.0]), torch.ones(1), torch.zeros(2, dtype=torch.long), eps=1.0)
    c = 1 / (math.sqrt(2) + 1.0)
    torch.testing.assert_close(adv, torch.tensor([-c, c], dtype=torch.float64))


def test_nan_weighted_sum_skips_nan_and_keeps_unscored_rows_nan():
    rewards = torch.tensor([[1.0, 2.0], [3.0, NAN], [NAN, NAN], [NAN, 4.0]])
    total = nan_weighted_sum(rewards, torch.tensor([1.0, 0.5]))
    assert total[[0, 1, 3]].tolist() == [2.0, 3.0, 2.0] and math.isnan(total[2])


def test_sum_then_normalize_weights_the_functions_before_the_statistics():
    rewards = torch.tensor([[1.0, 10.0], [3.0, NAN], [NAN, NAN], [4.0, 4.0], [4.4, NAN], [NAN, NAN]],
                           dtype=torch.float64)
    adv = sum_then_normalize(rewards, torch.tensor([1.0, 0.1], dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1]))
    # totals 2 and 3 (NaN skipped); group 1's totals are 4.4 and 4.4: flat, exactly 0; unscored rows
    # stay NaN (grpo_advantages turns them into 0)
    c = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv[:2], torch.tensor([-c, c], dtype=torch.float64))
    assert adv[3] == 0 and adv[4] == 0 and math.isnan(adv[2]) and math.isnan(adv[5])


def test_normalize_then_sum_hand_computed():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, 5.0], [0.0, 9.0], [NAN, NAN]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1])
    adv = grpo_advantages(rewards, torch.ones(2), groups, multi_reward="normalize_then_sum")
    # per function and group: (1, 3) -> -+1/(sqrt2 + e); (0, 0) and (10, 10) -> 0; (5, 9) -> -+2/(sqrt8 + e)
    s = 1 / (math.sqrt(2) + EPS)
    t = 2 / (math.sqrt(8) + EPS)
    sums = torch.tensor([-s, s, -t, t], dtype=torch.float64)
    # then a z-score over the four scored rows; the unscored row is out of it and gets 0
    std = sums.std(unbiased=True)
    torch.testing.assert_close(adv[:4], (sums - sums.mean()) / (std + EPS), rtol=1e-12, atol=1e-15)
    assert adv[4] == 0


def test_normalize_then_sum_skips_a_reward_without_a_group_std():
    # Function 0 scores one member of the group only: no std, so that row's sum is function 1's alone.
    rewards = torch.tensor([[5.0, 1.0], [NAN, 3.0]], dtype=torch.float64)
    adv = normalize_then_sum(rewards, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    z = 1 / (math.sqrt(2) + EPS)
    std = math.sqrt(2) * z  # Bessel std of (-z, z)
    torch.testing.assert_close(adv, torch.tensor([-z / (std + EPS), z / (std + EPS)], dtype=torch.float64))


def test_grpo_keep_drops_samples_from_the_statistics():
    keep = torch.tensor([True, True, False])
    adv = grpo_advantages(one([1.0, 3.0, 100.0]), torch.ones(1), torch.zeros(3, dtype=torch.long), keep=keep)
    c = 1 / (math.sqrt(2) + EPS)
    torch.testing.assert_close(adv, torch.tensor([-c, c, 0.0], dtype=torch.float64))


def test_nan_moments_per_group():
    values = torch.tensor([1.0, 3.0, NAN, 4.0, 2.0, 2.0, NAN], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    mean, std, flat = nan_moments(values, groups)
    assert mean[:6].tolist() == [2.0, 2.0, 2.0, 4.0, 2.0, 2.0]
    # torch's vectorised float64 sqrt is 1 ulp off math.sqrt on AVX512 CPUs: compare to 1e-15, not bitwise
    assert std[0].item() == pytest.approx(math.sqrt(2), rel=1e-15, abs=0)
    assert math.isnan(std[3]) and std[4] == 0  # one value: no Bessel std
    assert flat.tolist() == [False, False, False, True, True, True, False]  # a group without values is not flat
