"""Reward shaping along the trajectory: which steps to score, and their potentials.

The force field is evaluated on the clean molecule the network predicts at a step
(``z0_pred``, payload ``[B, T, N, 9]``); minus its (transformed) energy is the potential Psi of
that step. The engine's ``pbrs_return_to_go`` mode turns potentials into per-step returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elign.engine.errors import ConfigError, check_int, check_range

SCHEDULE_MODES = ("uniform", "adaptive")


def schedule_columns(num_steps: int, first_trained: int, mode: str, start_step: int, stride: int,
                     coarse_stride: int, fine_stride: int, threshold_fraction: float,
                     include_terminal: bool) -> Tensor:
    """Trajectory columns at which potentials are evaluated (ELIGN's RewardScheduler).

    Column ``j`` is the transition out of diffusion time ``t_j = (T - j) / T``. Scoring starts at
    ``max(start_step, first_trained)`` (untrained shared-prefix steps are never scored).
    ``uniform``: every ``stride``-th column. ``adaptive``: ``coarse_stride`` while
    ``t_j > threshold_fraction``, ``fine_stride`` after (the end of sampling, where molecules
    form, is scored densely). ``include_terminal`` always adds the last column.

    Returns:
        ``[T]`` bool.
    """
    mask = torch.zeros(num_steps, dtype=torch.bool)
    j = max(int(start_step), int(first_trained))
    while j < num_steps:
        mask[j] = True
        if mode == "uniform":
            j += stride
        else:
            j += coarse_stride if (num_steps - j) / num_steps > threshold_fraction else fine_stride
    if include_terminal:
        mask[num_steps - 1] = True
    return mask


class RewardScheduler:
    """Which steps of a trajectory the force field scores for shaping (uniform or adaptive strides)."""

    def __init__(self, mode: str, start_step: int, stride: int, coarse_stride: int, fine_stride: int,
                 threshold_fraction: float, include_terminal: bool) -> None:
        """
        Args:
            mode: "uniform" or "adaptive".
            start_step: first trajectory column scored (0 = from pure noise).
            stride: column stride in uniform mode.
            coarse_stride: stride while diffusion time > threshold_fraction (adaptive mode).
            fine_stride: stride after that (adaptive mode).
            threshold_fraction: diffusion-time fraction where adaptive mode switches to fine strides.
            include_terminal: always score the last column.
        """
        if mode not in SCHEDULE_MODES:
            raise ConfigError("mode", mode, SCHEDULE_MODES)
        for key, value in (("stride", stride), ("coarse_stride", coarse_stride), ("fine_stride", fine_stride)):
            check_int(key, value, 1)
        check_int("start_step", start_step, 0)
        check_range("threshold_fraction", threshold_fraction, 0.0, 1.0)
        self.mode, self.start_step, self.stride = mode, int(start_step), int(stride)
        self.coarse_stride, self.fine_stride = int(coarse_stride), int(fine_stride)
        self.threshold_fraction, self.include_terminal = float(threshold_fraction), bool(include_terminal)

    def __call__(self, num_steps: int, first_trained: int) -> Tensor:
        return schedule_columns(num_steps, first_trained, self.mode, self.start_step, self.stride,
                                self.coarse_stride, self.fine_stride, self.threshold_fraction,
                                self.include_terminal)


class PotentialShaping:
    """Configuration of shaping for :class:`elign.edm.force_reward.ForceFieldReward`."""

    def __init__(self, scheduler: RewardScheduler, channels: list[str], batch_size: int) -> None:
        """
        Args:
            scheduler: which steps are scored.
            channels: channels that get potentials: "energy" and/or "force" (the paper shapes
                only energy; force shaping was found unstable).
            batch_size: molecules per force-field call when scoring the trajectory.
        """
        allowed = ("energy", "force")
        channels = list(channels)
        if not channels or any(c not in allowed for c in channels):
            raise ConfigError("channels", channels, f"a non-empty subset of {list(allowed)}")
        self.scheduler, self.channels, self.batch_size = scheduler, channels, check_int("batch_size", batch_size, 1)
