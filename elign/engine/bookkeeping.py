"""Reward bookkeeping shared by every RL strategy: failures become the configured penalty and are
counted, ``keep`` is applied, and the ``reward/*`` and ``rollout/*`` statistics are logged the same
way whatever the strategy does with the rewards afterwards."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from elign.engine.advantages import replace_failures
from elign.engine.errors import ConfigError
from elign.engine.rollout import RewardOutput, Rollout
from elign.engine.strategies.base import ScoredRewards


def zero_spread_fraction(total: Tensor, group_ids: Tensor, keep: Tensor) -> float:
    """Fraction of groups whose kept members all have the same total reward (TRL's
    ``frac_reward_zero_std``): such a group gives no policy gradient. A group with fewer than two
    kept members has no spread either.

    Args:
        total: ``[B]`` total reward per sample.
        group_ids: ``[B]`` group of each sample.
        keep: ``[B]`` bool.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    g = int(index.max()) + 1 if index.numel() else 0
    inf = torch.full((g,), math.inf, dtype=total.dtype, device=total.device)
    low = inf.scatter_reduce(0, index[keep], total[keep], "amin")
    high = (-inf).scatter_reduce(0, index[keep], total[keep], "amax")
    count = torch.bincount(index[keep], minlength=g)
    flat = (count < 2) | (low == high)
    return float(flat.double().mean()) if g else 0.0


def mean_group_std(total: Tensor, group_ids: Tensor, keep: Tensor) -> float:
    """Mean over groups of the within-group std of the total reward (TRL's ``reward_std``): the
    spread GRPO's advantages are made of. It shrinks towards 0 as the policy scores every sample of
    a prompt alike (what the acceptance report's ``min_reward_std`` watches).

    Each group's std is over its kept members, with Bessel's correction (as TRL and the GRPO
    advantages); a group with fewer than two kept members has no std and is left out.

    Args:
        total: ``[B]`` total reward per sample (reward units).
        group_ids: ``[B]`` group of each sample.
        keep: ``[B]`` bool.

    Returns:
        The mean std in reward units; NaN when no group has two kept members.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    g = int(index.max()) + 1 if index.numel() else 0
    idx, values = index[keep], total[keep].double()
    count = torch.bincount(idx, minlength=g).double()
    mean = torch.zeros(g, dtype=torch.float64, device=total.device).index_add(0, idx, values) / count.clamp_min(1)
    squares = torch.zeros(g, dtype=torch.float64, device=total.device).index_add(0, idx, (values - mean[idx]) ** 2)
    ok = count >= 2
    return float((squares[ok] / (count[ok] - 1)).sqrt().mean()) if bool(ok.any()) else math.nan


class RewardBook:
    """Turns a reward's raw output into :class:`ScoredRewards` plus the reward metrics."""

    def __init__(self, failure_penalty: float) -> None:
        """
        Args:
            failure_penalty: reward given, in every channel, to a sample whose evaluation failed (NaN).
        """
        if not math.isfinite(failure_penalty):
            raise ConfigError("failure_penalty", failure_penalty, "a finite number")
        self.failure_penalty = float(failure_penalty)

    def __call__(self, reward: RewardOutput, rollout: Rollout,
                 weights: Callable[[list[str]], dict[str, float]]) -> tuple[ScoredRewards, dict[str, float]]:
        """Penalise failures, apply ``keep`` and compute the metrics.

        Logged: ``reward/<channel>`` mean and ``reward/<channel>_std`` over kept, successful samples,
        ``reward/<channel>_failed`` (count), ``reward/failed_<reason>`` (the reward's own reasons),
        ``reward/total`` (weighted sum of the channel means over kept samples, penalties included),
        ``rollout/frac_reward_zero_std``, ``rollout/reward_group_std`` (mean within-group std of the
        total) and, when samples are dropped, ``rollout/kept_frac``.
        """
        device = rollout.logp_old.device
        b = rollout.batch_size
        keep = torch.ones(b, dtype=torch.bool, device=device) if reward.keep is None else reward.keep.to(device).bool()
        w = weights(list(reward.channels))
        metrics: dict[str, float] = {}
        channels: dict[str, Tensor] = {}
        failed: dict[str, Tensor] = {}
        total = 0.0
        total_per_sample = torch.zeros(b, dtype=torch.float64, device=device)
        for name, raw in reward.channels.items():
            raw = raw.to(device, torch.float64)
            ok = ~torch.isnan(raw) & keep
            metrics[f"reward/{name}"] = raw[ok].mean().item() if ok.any() else float("nan")
            metrics[f"reward/{name}_std"] = raw[ok].std(unbiased=False).item() if ok.any() else float("nan")
            values, _ = replace_failures(raw, self.failure_penalty)
            failed[name] = torch.isnan(raw)
            metrics[f"reward/{name}_failed"] = float((failed[name] & keep).sum())
            channels[name] = values
            total += w[name] * (values.mean() if keep.all() else values[keep].mean()).item()
            total_per_sample += w[name] * values
        metrics["reward/total"] = total
        group_ids = rollout.group_ids.to(device)
        metrics["rollout/frac_reward_zero_std"] = zero_spread_fraction(total_per_sample, group_ids, keep)
        metrics["rollout/reward_group_std"] = mean_group_std(total_per_sample, group_ids, keep)
        if reward.keep is not None:
            metrics["rollout/kept_frac"] = keep.float().mean().item()
        for reason, count in reward.failures.items():
            metrics[f"reward/failed_{reason}"] = float(count)
        # Names with a group ("rollout/validity") are logged as they are, others under reward/.
        metrics.update({(k if "/" in k else f"reward/{k}"): float(v) for k, v in reward.metrics.items()})
        potentials = {name: replace_failures(p.to(device, torch.float64), self.failure_penalty)[0]
                      for name, p in reward.potentials.items()}
        mask = None if reward.potential_mask is None else reward.potential_mask.to(device)
        return ScoredRewards(channels=channels, keep=keep, potentials=potentials, potential_mask=mask,
                             failed=failed), metrics
