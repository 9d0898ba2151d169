"""GRPO with Hugging Face TRL's semantics (``GRPOTrainer``): its reward scaling, multi-reward
aggregation, importance sampling levels (token, GSPO sequence), asymmetric and two-sided clipping,
k3 KL and loss types ``grpo | bnpo | dr_grpo | dapo``.

The strategy is domain-free: for token policies a step is a completion token, for diffusion
policies a denoising step (where the closed-form Gaussian KL is also available).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from elign.engine.advantages import MULTI_REWARD, SCALE_REWARDS, grpo_advantages
from elign.engine.bookkeeping import zero_spread_fraction
from elign.engine.errors import ConfigError
from elign.engine.losses import (
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    aggregate_loss,
    clipped_objective,
    importance_weights,
    pair_sums,
    reference_kl,
)
from elign.engine.rollout import Rollout
from elign.engine.strategies.base import LossInputs, ScoredRewards


def finite(key: str, value: Any, ok: Callable[[float], bool] = lambda x: True, allowed: str = "a finite number") -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``key`` when it is not a finite number
    (NaN, inf, a string) or ``ok(value)`` is False."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, value, allowed) from None
    if isinstance(value, bool) or not math.isfinite(x) or not ok(x):
        raise ConfigError(key, value, allowed)
    return x


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, value, allowed)
    return str(value)


def weight_map(key: str, weights: Mapping[str, float] | None) -> dict[str, float]:
    """Channel -> finite weight, or a :class:`ConfigError` naming ``key``."""
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise ConfigError(key, weights, "a mapping of reward channel -> weight")
    return {str(k): finite(f"{key}.{k}", v) for k, v in dict(weights).items()}


def advantage_metrics(adv: Tensor, trained: Tensor) -> dict[str, float]:
    """``train/adv_abs_mean`` and ``train/adv_zero_frac`` over the trained pairs (``[B, T]`` bool)."""
    if not trained.any():
        return {}
    a = adv[trained]
    return {"train/adv_abs_mean": a.abs().mean().item(), "train/adv_zero_frac": (a == 0).float().mean().item()}


class GRPOStrategy:
    """TRL-exact GRPO: group-relative terminal advantages and a clipped policy-gradient loss."""

    kind = "rl"
    min_group_size = 2  # a group of one has no relative signal
    terminal_advantages = True

    def __init__(
        self,
        reward_weights: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
        multi_reward: str = "sum_then_normalize",
        scale_rewards: str = "group",
        std_eps: float = 1e-4,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        importance_sampling: str = "token",
        loss_type: str = "dapo",
        beta: float = 0.0,
        kl_estimator: str = "k3",
        kl_ratio_correction: bool = False,
    ) -> None:
        """
        Args:
            reward_weights: reward channel -> weight in the total reward (TRL's ``reward_weights``).
            default_weight: weight of channels not in ``reward_weights``.
            multi_reward: ``sum_then_normalize`` (weighted sum, then group-normalise) or
                ``normalize_then_sum`` (GDPO: z-score each channel in its group, weighted sum,
                z-score over the batch).
            scale_rewards: divide by the ``group`` std, the ``batch`` std, or ``none`` (Dr. GRPO);
                ``normalize_then_sum`` takes only ``group`` (its scaling is fixed).
            std_eps: added to the standard deviation (TRL: 1e-4).
            epsilon_low: lower clip width, ratio >= 1 - epsilon_low (TRL's ``epsilon``).
            epsilon_high: upper clip width, ratio <= 1 + epsilon_high; None = ``epsilon_low``
                (DAPO suggests 0.28).
            delta: INTELLECT-2 two-sided clipping: the unclipped ratio is also capped at delta
                (> 1 + epsilon_high); None = off.
            importance_sampling: ``token`` (per-token ratio) or ``sequence`` (GSPO: the
                exponentiated mean log-ratio of the sequence).
            loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see
                :func:`elign.engine.losses.aggregate_loss`).
            beta: weight of the KL to the reference policy; 0 loads no reference.
            kl_estimator: ``k3`` (from the reference's log-probs of the sampled actions) or
                ``gaussian`` (closed form, for Gaussian step policies).
            kl_ratio_correction: multiply the per-pair KL by the (differentiable, unclipped)
                importance weight, which makes the k3 gradient the unbiased reverse-KL gradient
                off-policy (DeepSeek-V3.2; TRL's ``use_bias_correction_kl``, on by default since TRL 1.x).
                It changes the KL gradient even on-policy, where the weight's value is 1.
        """
        self.channel_weights = weight_map("reward_weights", reward_weights)
        self.default_weight = finite("default_weight", default_weight)
        self.multi_reward = choice("multi_reward", multi_reward, MULTI_REWARD)
        self.scale_rewards = choice("scale_rewards", scale_rewards, SCALE_REWARDS)
        if self.multi_reward == "normalize_then_sum" and self.scale_rewards != "group":
            raise ConfigError("scale_rewards", scale_rewards,
                              "group with multi_reward=normalize_then_sum (GDPO always ends with a batch z-score)")
        self.std_eps = finite("std_eps", std_eps, lambda x: x > 0, "a number > 0")
        self.epsilon_low = finite("epsilon_low", epsilon_low, lambda x: 0 < x <= 1, "a number in (0, 1]")
        self.epsilon_high = (self.epsilon_low if epsilon_high is None
                             else finite("epsilon_high", epsilon_high, lambda x: x > 0, "a number > 0, or null"))
        self.delta = None if delta is None else finite(
            "delta", delta, lambda x: x > 1 + self.epsilon_high,
            f"a number > 1 + epsilon_high = {1 + self.epsilon_high}, or null")
        self.importance_sampling = choice("importance_sampling", importance_sampling, IMPORTANCE_LEVELS)
        self.loss_type = choice("loss_type", loss_type, LOSS_TYPES)
        self.beta = finite("beta", beta, lambda x: x >= 0, "a number >= 0")
        self.kl_estimator = choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        if not isinstance(kl_ratio_correction, bool):
            raise ConfigError("kl_ratio_correction", kl_ratio_correction, "true or false")
        self.kl_ratio_correction = kl_ratio_correction

    @property
    def needs_whole_sequences(self) -> bool:
        return self.importance_sampling == "sequence"

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def reward_weights(self, channels: list[str]) -> dict[str, float]:
        return {name: self.channel_weights.get(name, self.default_weight) for name in channels}

    def advantages(self, rewards: ScoredRewards, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """``[B, T]``: each sample's terminal advantage over all its steps (0 where ``keep`` is
        False), and ``train/adv_abs_mean`` / ``train/adv_zero_frac`` over the trained pairs, plus
        TRL's ``frac_reward_zero_std`` under TRL's name (the engine's ``rollout/frac_reward_zero_std``).

        The statistics are over the ``B`` samples given: with ``scale_rewards=batch`` (and GDPO's
        batch z-score) the batch is this rank's unless the caller gathered the rewards."""
        device = rollout.logp_old.device
        names = list(rewards.channels)
        weights = self.reward_weights(names)
        matrix = torch.stack([rewards.channels[n].to(device, torch.float64) for n in names], dim=1)
        keep = rewards.keep.to(device).bool()
        w = torch.tensor([weights[n] for n in names], dtype=torch.float64, device=device)
        group_ids = rollout.group_ids.to(device)
        adv = grpo_advantages(matrix, w, group_ids, keep, self.multi_reward, self.scale_rewards, self.std_eps)
        adv = adv.to(rollout.logp_old.dtype).unsqueeze(1).repeat(1, rollout.num_steps)
        metrics = advantage_metrics(adv, rollout.step_mask & keep.unsqueeze(1))
        metrics["frac_reward_zero_std"] = zero_spread_fraction(matrix @ w, group_ids, keep)
        return adv, metrics

    def loss(self, batch: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """``-min(rho' A, clip(rho) A) + beta KL`` per trained pair, aggregated by ``loss_type``.

        Sums (the ``kl`` logged is the one in the loss, corrected when ``kl_ratio_correction``, as TRL
        logs it): ``count``, ``loss``, ``clipped`` (TRL's ``clip_ratio/region_mean``), ``clipped_low``,
        ``clipped_high``, ``ratio`` and, with ``beta > 0``, ``kl``. At the sequence level the
        ratio and the clip indicators of a sequence count once per trained token (TRL counts
        them once per sequence)."""
        sequence = self.importance_sampling == "sequence"
        if sequence and not batch.whole_sequences:
            raise ValueError("importance_sampling=sequence needs whole sequences in one chunk "
                             "(trainer.step_chunk_size must be null)")
        ratio = importance_weights(batch.logp, batch.logp_old, batch.mask, self.importance_sampling,
                                   batch.seq_tokens if sequence else None)
        per_pair, low, high = clipped_objective(ratio, batch.advantages, self.epsilon_low, self.epsilon_high,
                                                self.delta)
        kl = None
        if self.beta > 0:
            if batch.reference is None:
                raise ValueError("beta > 0 needs the policy's reference terms (LossInputs.reference is None)")
            kl = reference_kl(batch.reference, batch.logp, self.kl_estimator, batch.mask)
            if self.kl_ratio_correction:
                kl = kl * ratio
            per_pair = per_pair + self.beta * kl
        loss = aggregate_loss(per_pair, batch.mask, batch.seq_tokens, batch.counts, self.loss_type)
        sums = pair_sums(batch.mask, per_pair.dtype, loss=per_pair, clipped=low | high, clipped_low=low,
                         clipped_high=high, ratio=ratio, kl=kl)
        return loss, sums
