"""Reward bookkeeping shared by every strategy: penalties, failure counts, keep, zero-spread groups."""

import math

import pytest
import torch

from elign.engine.bookkeeping import RewardBook, mean_group_std, zero_spread_fraction
from elign.engine.errors import ConfigError
from elign.engine.rollout import RewardOutput, Rollout


def rollout(b=6, t=2, groups=(0, 0, 0, 1, 1, 1)):
    return Rollout(group_ids=torch.tensor(groups), logp_old=torch.zeros(b, t), step_mask=torch.ones(b, t, dtype=torch.bool))


def weights(names):
    return {"a": 1.0, "b": 0.5}


def test_failures_become_the_penalty_and_are_counted_and_kept_out_of_the_means():
    out = RewardOutput(channels={"a": torch.tensor([1.0, float("nan"), 3.0, 2.0, 2.0, 2.0]),
                                 "b": torch.tensor([0.0, 2.0, 4.0, float("nan"), float("nan"), 6.0])},
                       failures={"scf": 3}, metrics={"validity": 0.5, "rollout/custom": 2.0})
    scored, m = RewardBook(failure_penalty=-5.0)(out, rollout(), weights)
    assert scored.channels["a"].tolist() == [1.0, -5.0, 3.0, 2.0, 2.0, 2.0]
    assert scored.channels["b"].tolist() == [0.0, 2.0, 4.0, -5.0, -5.0, 6.0]
    assert scored.failed["b"].tolist() == [False, False, False, True, True, False]
    # means and stds over the successful samples only: a = (1+3+2+2+2)/5 = 2, b = (0+2+4+6)/4 = 3
    assert m["reward/a"] == 2.0 and m["reward/b"] == 3.0
    assert m["reward/a_std"] == pytest.approx(math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2) / 5))
    assert m["reward/a_failed"] == 1.0 and m["reward/b_failed"] == 2.0 and m["reward/failed_scf"] == 3.0
    # total = sum_c w_c * mean(penalised values): 1 * (5/6) + 0.5 * (2/6)
    assert m["reward/total"] == pytest.approx(5 / 6 + 0.5 * 2 / 6)
    assert m["reward/validity"] == 0.5 and m["rollout/custom"] == 2.0
    # group 1's totals: 2 - 2.5, 2 - 2.5, 2 + 3: not flat; group 0 not flat either
    assert m["rollout/frac_reward_zero_std"] == 0.0
    # within-group std of those totals (Bessel): group 0 = 1 + 0, -5 + 1, 3 + 2 = 1, -4, 5 (mean 2/3);
    # group 1 = -0.5, -0.5, 5 (mean 4/3)
    g0 = math.sqrt(sum((x - 2 / 3) ** 2 for x in (1.0, -4.0, 5.0)) / 2)
    g1 = math.sqrt(sum((x - 4 / 3) ** 2 for x in (-0.5, -0.5, 5.0)) / 2)
    assert m["rollout/reward_group_std"] == pytest.approx((g0 + g1) / 2)
    assert "rollout/kept_frac" not in m


def test_keep_drops_samples_from_every_statistic():
    out = RewardOutput(channels={"a": torch.tensor([1.0, 100.0, 3.0, 2.0, 2.0, 7.0])},
                       keep=torch.tensor([True, False, True, True, True, False]))
    scored, m = RewardBook(failure_penalty=-1.0)(out, rollout(), lambda names: {"a": 1.0})
    assert scored.keep.tolist() == [True, False, True, True, True, False]
    assert m["reward/a"] == 2.0 and m["reward/total"] == 2.0  # (1 + 3 + 2 + 2) / 4
    assert m["rollout/kept_frac"] == pytest.approx(4 / 6)
    # group 1 keeps 2.0, 2.0 (the 7.0 is dropped): no spread; group 0 keeps 1, 3
    assert m["rollout/frac_reward_zero_std"] == 0.5
    # group 0 keeps 1, 3 (std sqrt(2)), group 1 keeps 2, 2 (std 0)
    assert m["rollout/reward_group_std"] == pytest.approx(math.sqrt(2) / 2)


def test_zero_spread_fraction_hand_computed():
    total = torch.tensor([1.0, 1.0, 2.0, 5.0, 5.0, 5.0, 4.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9])  # arbitrary ids; group 9 is a singleton
    keep = torch.ones(7, dtype=torch.bool)
    assert zero_spread_fraction(total, groups, keep) == pytest.approx(2 / 3)
    keep[2] = False  # group 7 is now 1.0, 1.0: flat too
    assert zero_spread_fraction(total, groups, keep) == 1.0


def test_penalty_is_applied_to_potentials_too():
    out = RewardOutput(channels={"a": torch.tensor([1.0, 2.0])},
                       potentials={"a": torch.tensor([[0.5, float("nan")], [1.0, 2.0]])},
                       potential_mask=torch.tensor([True, True]))
    scored, _ = RewardBook(failure_penalty=-3.0)(out, rollout(2, 2, (0, 0)), lambda names: {"a": 1.0})
    assert scored.potentials["a"].tolist() == [[0.5, -3.0], [1.0, 2.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_penalty_must_be_finite(bad):
    with pytest.raises(ConfigError, match="failure_penalty"):
        RewardBook(failure_penalty=bad)


def test_mean_group_std_hand_computed():
    total = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9])  # group 9 is a singleton: no std, left out
    keep = torch.ones(7, dtype=torch.bool)
    # group 7: mean 2, Σ d² = 2, std sqrt(2 / 2) = 1; group 3: 0
    assert mean_group_std(total, groups, keep) == pytest.approx(0.5)
    keep[1] = False  # group 7 keeps 1, 3: std sqrt(((1-2)² + (3-2)²) / 1) = sqrt(2)
    assert mean_group_std(total, groups, keep) == pytest.approx(math.sqrt(2) / 2)
    assert math.isnan(mean_group_std(total, groups, torch.tensor([True, False, False, True, False, False, True])))
