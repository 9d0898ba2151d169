import pytest

from elign.engine.errors import ConfigError
from elign.engine.schedule import ConstantSchedule, WarmupCosineSchedule, warmup_cosine_factor


def test_warmup_cosine_hand_computed():
    f = [warmup_cosine_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.1) for s in range(8)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3)
    assert f[2] == pytest.approx(1.0)
    assert f[4] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f[6] == pytest.approx(0.1)
    assert f[7] == pytest.approx(0.1), "must stay clamped after total_steps"
    assert warmup_cosine_factor(10_000, 2, 6, 0.1) == pytest.approx(0.1)


def test_first_step_is_never_zero():
    assert WarmupCosineSchedule(10, 100, 0.05)(0) > 0
    assert ConstantSchedule(5)(0) > 0


def test_min_lr_ratio_zero_is_rejected():
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        WarmupCosineSchedule(1, 10, 0.0)


def test_total_steps_filled_by_bind():
    s = WarmupCosineSchedule(0, None, 0.5).bind(4)
    assert s(4) == pytest.approx(0.5)
