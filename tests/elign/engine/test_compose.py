"""ComposedReward: channels of several rewards side by side, prefixed failures and metrics, keep = AND, and
errors for clashing channel names or an empty composition."""

import pytest
import torch

from elign.engine.compose import ComposedReward
from elign.engine.errors import ConfigError
from elign.engine.rollout import ConstantReward, RewardOutput, Rollout


def _rollout(b=4):
    return Rollout(group_ids=torch.zeros(b, dtype=torch.long), logp_old=torch.zeros(b, 2),
                   step_mask=torch.ones(b, 2, dtype=torch.bool))


class Flaky:
    """Channel ``score`` = 0, 1, 2, ... with sample 1 failed (NaN) and sample 3 dropped."""

    def __call__(self, rollout):
        values = torch.arange(rollout.batch_size, dtype=torch.float64)
        values[1] = float("nan")
        keep = torch.ones(rollout.batch_size, dtype=torch.bool)
        keep[3] = False
        return RewardOutput(channels={"score": values}, failures={"timeout": 1}, metrics={"time_s": 0.5}, keep=keep)


def test_channels_side_by_side_with_prefixed_failures_and_metrics():
    composed = ComposedReward({"flaky": Flaky(), "const": ConstantReward({"mlm": -2.0}, {"frac_tagged": 0.25})})
    out = composed(_rollout())
    assert set(out.channels) == {"score", "mlm"} and out.channels["mlm"].tolist() == [-2.0] * 4
    assert torch.isnan(out.channels["score"][1])  # NaN passes through: the engine applies its penalty
    assert out.failures == {"flaky_timeout": 1}
    assert out.metrics == {"flaky_time_s": 0.5, "const_frac_tagged": 0.25}
    assert out.keep.tolist() == [True, True, True, False]


def test_clashing_channels_and_empty_compositions_are_refused():
    with pytest.raises(ValueError, match="'mlm' comes from both 'a' and 'b'"):
        ComposedReward({"a": ConstantReward({"mlm": 1.0}), "b": ConstantReward({"mlm": 2.0})})(_rollout())
    with pytest.raises(ConfigError, match="rewards"):
        ComposedReward({})
    with pytest.raises(ConfigError, match="rewards.x"):
        ComposedReward({"x": 3})
