"""EDM's fixed ``polynomial_2`` noise schedule (Hoogeboom et al., 2022), stored as a gamma table.

``gamma = log(sigma^2 / alpha^2)`` with ``alpha^2 = sigmoid(-gamma)`` and ``sigma^2 = sigmoid(gamma)``
(variance preserving). Continuous time ``t`` in ``[0, 1]`` is looked up at ``round(t * steps)``, so a
sampler with ``T`` steps that divides ``steps`` reads every ``steps / T``-th entry (strided DDPM).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from elign.engine.errors import check_int, check_range


def polynomial_alphas2(steps: int, power: float, precision: float, clip_value: float = 0.001) -> Tensor:
    """``alpha^2`` at ``k = 0..steps`` (float64 ``[steps + 1]``), exactly as upstream ``polynomial_schedule``.

    Clipping the successive ratios from below stops the last steps from jumping straight to pure noise
    (the raw polynomial reaches alpha^2 = 0 at k = steps, an infinite gamma).
    """
    k = torch.arange(steps + 1, dtype=torch.float64)
    alphas2 = (1.0 - (k / steps) ** power) ** 2
    # Ratios are taken against a leading 1, as upstream does, so alpha^2_0 keeps its own value.
    padded = torch.cat([torch.ones(1, dtype=torch.float64), alphas2])
    ratios = (padded[1:] / padded[:-1]).clamp(min=clip_value, max=1.0)
    alphas2 = torch.cumprod(ratios, dim=0)
    return (1.0 - 2.0 * precision) * alphas2 + precision


class PolynomialSchedule(nn.Module):
    """Fixed noise schedule: a ``[steps + 1]`` buffer of gamma values.

    Args:
        steps: number of discrete diffusion steps of the table (1000 for the QM9 model).
        power: polynomial power (2 for ``polynomial_2``).
        precision: the floor ``s`` added to ``alpha^2`` so that gamma stays finite at both ends.
    """

    def __init__(self, steps: int = 1000, power: float = 2.0, precision: float = 1e-5) -> None:
        super().__init__()
        self.steps = check_int("steps", steps, 1)
        self.power = check_range("power", power, 0.0, low_open=True)
        self.precision = check_range("precision", precision, 0.0, 0.5, low_open=True, high_open=True)
        alphas2 = polynomial_alphas2(self.steps, self.power, self.precision)
        sigmas2 = 1.0 - alphas2
        # Computed in float64 and stored in float32, like upstream's numpy table, so values agree.
        gamma = -(torch.log(alphas2) - torch.log(sigmas2))
        self.register_buffer("table", gamma.float(), persistent=True)

    def gamma(self, t: Tensor) -> Tensor:
        """gamma at continuous times ``t`` (any shape, values in ``[0, 1]``); same shape as ``t``."""
        index = torch.round(t.to(torch.float64) * self.steps).long()
        return self.table[index.to(self.table.device)]

    def forward(self, t: Tensor) -> Tensor:
        return self.gamma(t)

    @staticmethod
    def sigma2(gamma: Tensor) -> Tensor:
        """Noise variance ``sigma^2 = sigmoid(gamma)``."""
        return torch.sigmoid(gamma)

    @staticmethod
    def alpha2(gamma: Tensor) -> Tensor:
        """Signal variance ``alpha^2 = sigmoid(-gamma)``."""
        return torch.sigmoid(-gamma)

    @staticmethod
    def sigma(gamma: Tensor) -> Tensor:
        return torch.sigmoid(gamma).sqrt()

    @staticmethod
    def alpha(gamma: Tensor) -> Tensor:
        return torch.sigmoid(-gamma).sqrt()
