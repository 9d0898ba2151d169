"""FED-GRPO: per-channel group-normalised advantages and a PPO-clipped surrogate with a KL penalty.

Plain GRPO is the one-channel case. The strategy only does tensor math; it knows nothing about
molecules, tokens or optimizers.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from elign.engine.advantages import fed_advantages, pbrs_return_to_go, replace_failures
from elign.engine.errors import ConfigError
from elign.engine.losses import clipped_surrogate, masked_sum
from elign.engine.rollout import RewardOutput, Rollout

ADVANTAGE_MODES = ("terminal", "pbrs_return_to_go")


class FedGRPOStrategy:
    """Disentangled group normalisation per reward channel, clipped surrogate, KL to a reference."""

    min_group_size = 2  # a group of one has no relative signal

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
        failure_penalty: float,
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
            failure_penalty: reward given to a sample whose evaluation failed (NaN channel value).
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
        self.failure_penalty = float(failure_penalty)

    @property
    def uses_kl(self) -> bool:
        return self.kl_coef > 0

    def weight(self, channel: str) -> float:
        return self.channel_weights.get(channel, self.default_weight)

    def advantages(self, reward: RewardOutput, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """``[B, T]`` advantages from the reward channels, and the reward/advantage metrics.

        Failed samples (NaN) get ``failure_penalty`` in that channel and are counted.
        """
        metrics: dict[str, float] = {}
        channels: dict[str, Tensor] = {}
        returns: dict[str, Tensor] = {}
        total = 0.0
        for name, raw in reward.channels.items():
            raw = raw.to(rollout.logp_old.device, torch.float64)
            ok = ~torch.isnan(raw)
            metrics[f"reward/{name}"] = raw[ok].mean().item() if ok.any() else float("nan")
            metrics[f"reward/{name}_std"] = raw[ok].std(unbiased=False).item() if ok.any() else float("nan")
            values, n_failed = replace_failures(raw, self.failure_penalty)
            metrics[f"reward/{name}_failed"] = float(n_failed)
            channels[name] = values
            total += self.weight(name) * values.mean().item()
            if self.advantage_mode == "pbrs_return_to_go" and name in reward.potentials:
                potentials, _ = replace_failures(reward.potentials[name].to(values), self.failure_penalty)
                returns[name] = pbrs_return_to_go(potentials, values, reward.potential_mask, self.pbrs_gamma)
        metrics["reward/total"] = total
        for reason, count in reward.failures.items():
            metrics[f"reward/failed_{reason}"] = float(count)
        # Names with a group ("rollout/validity") are logged as they are, others under reward/.
        metrics.update({(k if "/" in k else f"reward/{k}"): float(v) for k, v in reward.metrics.items()})

        keep = None if reward.keep is None else reward.keep.to(rollout.logp_old.device)
        evaluated = None if reward.potential_mask is None else reward.potential_mask.to(rollout.logp_old.device)
        adv = fed_advantages(
            channels, {n: self.weight(n) for n in channels}, rollout.group_ids, rollout.num_steps,
            returns=returns, evaluated=evaluated, keep=keep, clip=self.adv_clip, eps=self.std_eps,
        ).to(rollout.logp_old.dtype)
        trained = rollout.step_mask if keep is None else rollout.step_mask & keep.unsqueeze(1)
        if trained.any():
            a = adv[trained]
            metrics["train/adv_abs_mean"] = a.abs().mean().item()
            metrics["train/adv_zero_frac"] = (a == 0).float().mean().item()
        if keep is not None:
            metrics["rollout/kept_frac"] = keep.float().mean().item()
        return adv, metrics

    def loss(
        self, logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor, kl: Tensor | None, denom: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch and step chunk, already divided by ``denom`` (the number of
        trained (sample, step) pairs of the whole optimizer step, so chunks add up to a mean).

        Args:
            logp, logp_old, adv: ``[b, t]``.
            mask: ``[b, t]`` bool, trained pairs.
            kl: ``[b, t]`` KL to the reference, or None.
            denom: normaliser.

        Returns:
            ``(loss, sums)``; ``sums`` are detached sums over masked pairs (``count``, ``loss``,
            ``clipped``, ``kl``, ``ratio``) that the trainer turns into means.
        """
        if self.adv_clip is not None:
            adv = adv.clamp(-self.adv_clip, self.adv_clip)
        per_pair, ratio, clipped = clipped_surrogate(logp, logp_old, adv, self.clip_range)
        if kl is not None and self.kl_coef > 0:
            per_pair = per_pair + self.kl_coef * kl
        loss = masked_sum(per_pair, mask) / denom
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
