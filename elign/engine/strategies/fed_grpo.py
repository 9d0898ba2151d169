"""FED-GRPO: per-channel group-normalised advantages and a PPO-clipped surrogate with a KL penalty.

Plain GRPO is the one-channel case. The strategy only does tensor math; it knows nothing about
molecules, tokens or optimizers.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from elign.engine.advantages import fed_advantages, pbrs_return_to_go
from elign.engine.errors import ConfigError
from elign.engine.losses import clipped_surrogate, masked_sum
from elign.engine.rollout import Rollout
from elign.engine.strategies.base import LossInputs, ScoredRewards

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
            kl_estimator: "gaussian" (closed form from the step means, exact for Gaussian policies)
                or "k3" (``exp(ref - logp) - (ref - logp) - 1`` from the sampled actions' log-probs).
        """
        if advantage_mode not in ADVANTAGE_MODES:
            raise ConfigError("advantage_mode", advantage_mode, ADVANTAGE_MODES)
        if not clip_range > 0:
            raise ConfigError("clip_range", clip_range, "a number > 0")
        if kl_coef < 0:
            raise ConfigError("kl_coef", kl_coef, "a number >= 0")
        if adv_clip is not None and not adv_clip > 0:
            raise ConfigError("adv_clip", adv_clip, "a number > 0, or null for no clipping")
        if not std_eps > 0:
            raise ConfigError("std_eps", std_eps, "a number > 0")
        if not 0 < pbrs_gamma <= 1:
            raise ConfigError("pbrs_gamma", pbrs_gamma, "a number in (0, 1]")
        self.channel_weights = {str(k): float(v) for k, v in dict(channel_weights).items()}
        self.default_weight = float(default_weight)
        self.advantage_mode = advantage_mode
        self.pbrs_gamma = float(pbrs_gamma)
        self.adv_clip = None if adv_clip is None else float(adv_clip)
        self.std_eps = float(std_eps)
        self.clip_range = float(clip_range)
        self.kl_coef = float(kl_coef)
        if kl_estimator not in ("gaussian", "k3"):
            raise ConfigError("kl_estimator", kl_estimator, ("gaussian", "k3"))
        self.kl_estimator = kl_estimator

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
        metrics: dict[str, float] = {}
        trained = rollout.step_mask & keep.unsqueeze(1)
        if trained.any():
            a = adv[trained]
            metrics["train/adv_abs_mean"] = a.abs().mean().item()
            metrics["train/adv_zero_frac"] = (a == 0).float().mean().item()
        return adv, metrics

    def loss(self, batch: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate plus ``kl_coef`` times the closed-form Gaussian KL, summed over the
        trained pairs and divided by this rank's trained pairs of the optimizer step (``bnpo``)."""
        adv = batch.advantages
        if self.adv_clip is not None:
            adv = adv.clamp(-self.adv_clip, self.adv_clip)
        per_pair, ratio, clipped = clipped_surrogate(batch.logp, batch.logp_old, adv, self.clip_range)
        kl = None
        if batch.reference is not None and self.kl_coef > 0:
            ref = batch.reference
            if self.kl_estimator == "gaussian":
                kl = ref.gaussian_kl()
            else:
                delta = ref.ref_logp - batch.logp
                kl = torch.exp(delta) - delta - 1.0
            per_pair = per_pair + self.kl_coef * kl
        mask = batch.mask
        loss = masked_sum(per_pair, mask) / max(batch.counts.tokens, 1.0)
        m = mask.to(per_pair.dtype)
        sums = {
            "count": m.sum().detach(),
            "loss": masked_sum(per_pair.detach(), m),
            "clipped": masked_sum(clipped.to(m.dtype), m),
            "ratio": masked_sum(ratio.detach(), m),
        }
        if kl is not None:
            sums["kl"] = masked_sum(kl.detach(), m)
        return loss, sums
