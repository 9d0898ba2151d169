"""PolynomialSchedule: upstream's polynomial_2 table, checked values, strided lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elign.edm.schedule import PolynomialSchedule
from elign.engine.errors import ConfigError


def _upstream_gamma(timesteps: int, s: float, power: float) -> np.ndarray:
    """Upstream EDM's ``polynomial_schedule`` + ``clip_noise_schedule`` in numpy, verbatim logic."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas2 = (1 - np.power(x / steps, power)) ** 2
    alphas2 = np.concatenate([np.ones(1), alphas2], axis=0)
    alphas2 = np.cumprod(np.clip(alphas2[1:] / alphas2[:-1], a_min=0.001, a_max=1.0), axis=0)
    alphas2 = (1 - 2 * s) * alphas2 + s
    return -(np.log(alphas2) - np.log(1 - alphas2))


def test_checked_values() -> None:
    table = PolynomialSchedule(steps=1000, power=2.0, precision=1e-5).table
    assert table.shape == (1001,) and table.dtype == torch.float32
    assert table[0].item() == pytest.approx(-11.5129, abs=1e-4)
    assert table[500].item() == pytest.approx(-0.2513, abs=1e-4)
    assert table[1000].item() == pytest.approx(11.5125, abs=1e-4)
    assert torch.all(table[1:] > table[:-1])


def test_matches_upstream_numpy_table() -> None:
    ours = PolynomialSchedule(steps=1000).table
    ref = torch.from_numpy(_upstream_gamma(1000, 1e-5, 2.0)).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)


def test_strided_lookup_reads_every_20th_entry() -> None:
    sched = PolynomialSchedule()
    j = torch.arange(51)
    t = (j.float() / 50).float()  # float32 times, as the sampler feeds the network
    torch.testing.assert_close(sched.gamma(t), sched.table[20 * j], atol=0, rtol=0)
    assert sched.gamma(torch.tensor(0.0)).shape == ()


def test_variance_preserving_helpers() -> None:
    gamma = PolynomialSchedule().table
    torch.testing.assert_close(PolynomialSchedule.alpha2(gamma) + PolynomialSchedule.sigma2(gamma), torch.ones(1001))
    torch.testing.assert_close(PolynomialSchedule.alpha(gamma) ** 2, PolynomialSchedule.alpha2(gamma))
    torch.testing.assert_close(PolynomialSchedule.sigma(gamma) ** 2, PolynomialSchedule.sigma2(gamma))


def test_bad_precision_raises() -> None:
    with pytest.raises(ConfigError, match="precision"):
        PolynomialSchedule(precision=0.0)
