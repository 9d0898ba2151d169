"""check_range / check_finite / check_int: NaN and ±inf never pass, the message names the key."""

import math

import numpy as np
import pytest

from elign.engine.errors import ConfigError, check_finite, check_int, check_range


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float64("nan"), "1.0", True, None, [1.0]])
def test_check_finite_rejects_non_numbers_and_non_finite(bad):
    with pytest.raises(ConfigError) as info:
        check_finite("strategy.failure_penalty", bad)
    assert info.value.key == "strategy.failure_penalty"
    assert "finite" in info.value.allowed


def test_check_finite_returns_a_float_and_allows_null_only_when_asked():
    assert check_finite("x", np.float32(2.5)) == 2.5 and type(check_finite("x", 3)) is float
    assert check_finite("x", None, allow_none=True) is None
    with pytest.raises(ConfigError, match=r"or null \(off\)"):
        check_finite("x", math.nan, allow_none=True, none_means="off")


@pytest.mark.parametrize("value,kwargs,ok", [
    (0.0, dict(low=0.0), True),
    (0.0, dict(low=0.0, low_open=True), False),
    (1.0, dict(low=0.0, high=1.0), True),
    (1.0, dict(low=0.0, high=1.0, high_open=True), False),
    (-1e-12, dict(low=0.0), False),
    (5.0, dict(high=4.0), False),
    (math.inf, dict(low=0.0), False),  # inf is "> 0" but means nothing as a config value
    (math.nan, dict(), False),
])
def test_check_range_bounds(value, kwargs, ok):
    if ok:
        assert check_range("k", value, **kwargs) == value
    else:
        with pytest.raises(ConfigError, match="k="):
            check_range("k", value, **kwargs)


def test_check_range_message_states_the_interval():
    with pytest.raises(ConfigError) as info:
        check_range("lr_schedule.min_lr_ratio", 0.0, 0.0, 1.0, low_open=True)
    assert info.value.allowed == "a finite number in (0, 1]"


def test_check_int():
    assert check_int("num_workers", 4.0, 0) == 4 and type(check_int("n", 4.0)) is int
    for bad in (2.5, math.nan, math.inf, "3", -1):
        with pytest.raises(ConfigError) as info:
            check_int("num_workers", bad, 0)
        assert info.value.allowed == "an integer >= 0"
    assert check_int("n", None, 1, allow_none=True) is None


def test_allowed_replaces_the_generated_description():
    with pytest.raises(ConfigError) as info:
        check_int("num_steps", math.nan, 1, allowed="divisors of 1000: 1, 2, 4")
    assert info.value.allowed == "divisors of 1000: 1, 2, 4"
