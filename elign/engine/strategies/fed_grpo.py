"""FED-GRPO: per-channel group-normalised advantages and a PPO-clipped surrogate with a KL penalty.

Plain GRPO is the one-channel case. The strategy only does tensor math; it knows nothing about
molecules, tokens or optimizers. In terms of the shared pieces it is: disentangled per-channel
group normalisation (population std, ``std_eps``), weighted sum and clip of the advantages; a
per-token ratio with a symmetric clip; ``bnpo`` aggregation; the closed-form Gaussian KL (or k3).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from elign.engine.advantages import fed_advantages, pbrs_return_to_go
from elign.engine.errors import ConfigError
from elign.engine.losses import (
    KL_ESTIMATORS,
    aggregate_loss,
    clipped_objective,
    importance_weights,
    outside_band,
    pair_sums,
    reference_kl,
)
from elign.engine.rollout import Rollout
from elign.engine.strategies.base import LossInputs, ScoredRewards
from elign.engine.strategies.grpo import advantage_metrics, choice, finite, weight_map

ADVANTAGE_MODES = ("terminal", "pbrs_return_to_go")


class FedGRPOStrategy:
    """Disentangled group normalisation per reward channel, clipped surrogate, KL to a reference."""

    kind = "rl"
    min_group_size = 2  # a group of one has no relative signal
    needs_whole_sequences = False  # per-step ratios: chunks of steps add up

    def __init__(
        self,
        channel_weights: Mapping[str, float],
        default_weight: float,
        advantage_mode: str,
        pbrs_gamma: float,
        adv_clip: float | None,
        std_eps: float,
        clip_range: float,
        kl_coef: float,
        kl_estimator: str = "gaussian",
    ) -> None:
        """
        Args:
            channel_weights: reward channel -> weight of its normalised advantage (w_F, w_E, ...).
            default_weight: weight of channels a reward emits that are not in ``channel_weights``.
            advantage_mode: "terminal" (one advantage per trajectory) or "pbrs_return_to_go"
                (channels that come with potentials get per-step returns, normalised per step).
            pbrs_gamma: discount of the return-to-go.
            adv_clip: clip of the combined advantage to [-c, c]; None = no clipping.
            std_eps: epsilon added to the group standard deviation.
            clip_range: PPO ratio clip epsilon.
            kl_coef: weight beta of the KL to the frozen reference (0 = no reference pass).
            kl_estimator: "gaussian" (closed form from the step means) or "k3" (from the
                reference's log-probs of the recorded actions).
        """
        self.advantage_mode = choice("advantage_mode", advantage_mode, ADVANTAGE_MODES)
        self.channel_weights = weight_map("channel_weights", channel_weights)
        self.default_weight = finite("default_weight", default_weight)
        self.pbrs_gamma = finite("pbrs_gamma", pbrs_gamma, lambda x: 0 < x <= 1, "a number in (0, 1]")
        self.adv_clip = None if adv_clip is None else finite(
            "adv_clip", adv_clip, lambda x: x > 0, "a number > 0, or null for no clipping")
        self.std_eps = finite("std_eps", std_eps, lambda x: x > 0, "a number > 0")
        self.clip_range = finite("clip_range", clip_range, lambda x: x > 0, "a number > 0")
        self.kl_coef = finite("kl_coef", kl_coef, lambda x: x >= 0, "a number >= 0")
        self.kl_estimator = choice("kl_estimator", kl_estimator, KL_ESTIMATORS)

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def terminal_advantages(self) -> bool:
        return self.advantage_mode == "terminal"

    def weight(self, channel: str) -> float:
        return self.channel_weights.get(channel, self.default_weight)

    def reward_weights(self, channels: list[str]) -> dict[str, float]:
        return {name: self.weight(name) for name in channels}

    def advantages(self, rewards: ScoredRewards, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """``[B, T]`` advantages from the scored reward channels, and advantage diagnostics."""
        device = rollout.logp_old.device
        channels = {name: values.to(device, torch.float64) for name, values in rewards.channels.items()}
        returns: dict[str, Tensor] = {}
        if self.advantage_mode == "pbrs_return_to_go":
            for name, potentials in rewards.potentials.items():
                returns[name] = pbrs_return_to_go(potentials.to(channels[name]), channels[name],
                                                  rewards.potential_mask, self.pbrs_gamma)
        keep = rewards.keep.to(device)
        evaluated = None if rewards.potential_mask is None else rewards.potential_mask.to(device)
        adv = fed_advantages(
            channels, self.reward_weights(list(channels)), rollout.group_ids, rollout.num_steps,
            returns=returns, evaluated=evaluated, keep=None if keep.all() else keep, clip=self.adv_clip,
            eps=self.std_eps,
        ).to(rollout.logp_old.dtype)
        return adv, advantage_metrics(adv, rollout.step_mask & keep.unsqueeze(1))

    def loss(self, batch: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate plus ``kl_coef`` times the KL, summed over the trained pairs and
        divided by this rank's trained pairs of the optimizer step (``bnpo``).

        Sums: ``count``, ``loss``, ``clipped`` (``|rho - 1| > clip_range``, whatever the sign of
        the advantage), ``ratio`` and, with a reference, ``kl``."""
        adv = batch.advantages
        if self.adv_clip is not None:
            adv = adv.clamp(-self.adv_clip, self.adv_clip)
        ratio = importance_weights(batch.logp, batch.logp_old, batch.mask, "token")
        per_pair, _, _ = clipped_objective(ratio, adv, self.clip_range, self.clip_range)
        kl = None
        if batch.reference is not None and self.kl_coef > 0:
            kl = reference_kl(batch.reference, batch.logp, self.kl_estimator, batch.mask)
            per_pair = per_pair + self.kl_coef * kl
        loss = aggregate_loss(per_pair, batch.mask, batch.seq_tokens, batch.counts, "bnpo")
        sums = pair_sums(batch.mask, per_pair.dtype, loss=per_pair, clipped=outside_band(ratio, self.clip_range),
                         ratio=ratio, kl=kl)
        return loss, sums
