"""Several rewards as one: their channels side by side, weighted by the strategy like any channels.

``reward=composed`` with ``rewards: {conformer: {...}, mlm: {...}}`` runs each reward on the same rollout and
merges what they return. Channel names must differ across rewards (each keeps its own name, so
``strategy.channel_weights`` / ``reward_weights`` address them as before); failures and metrics are prefixed
with the reward's name (``reward/failed_<name>_<reason>``, ``reward/<name>_<metric>``); a sample is kept only if
every reward keeps it. Potentials must share one step mask.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from elign.engine.errors import ConfigError
from elign.engine.rollout import RewardOutput, Rollout

__all__ = ["ComposedReward"]


class ComposedReward:
    """The ``composed`` reward group: ``rewards`` maps a name to a built reward (Hydra builds the nested
    ``_target_`` nodes first)."""

    def __init__(self, rewards: Mapping[str, Any]) -> None:
        if not isinstance(rewards, Mapping) or not rewards:
            raise ConfigError("rewards", rewards, "a mapping of name -> reward (at least one)")
        bad = [name for name, r in rewards.items() if not callable(r)]
        if bad:
            raise ConfigError(f"rewards.{bad[0]}", type(rewards[bad[0]]).__name__, "a reward (a _target_ node)")
        self.rewards = dict(rewards)

    def __call__(self, rollout: Rollout) -> RewardOutput:
        channels, potentials, failures, metrics = {}, {}, {}, {}
        keep, mask, owner = None, None, {}
        for name, reward in self.rewards.items():
            out = reward(rollout)
            for channel, values in out.channels.items():
                if channel in channels:
                    raise ValueError(f"reward channel {channel!r} comes from both {owner[channel]!r} and {name!r}; "
                                     "rename one (e.g. the masked-LM reward's channel key)")
                channels[channel], owner[channel] = values, name
            if out.potentials:
                if mask is not None and not torch.equal(mask, out.potential_mask):
                    raise ValueError(f"reward {name!r} evaluates potentials at other steps than an earlier reward")
                mask = out.potential_mask
                potentials.update(out.potentials)
            failures.update({f"{name}_{reason}": n for reason, n in out.failures.items()})
            metrics.update({f"{name}_{key}": v for key, v in out.metrics.items()})
            if out.keep is not None:
                keep = out.keep if keep is None else keep & out.keep
        return RewardOutput(channels=channels, potentials=potentials, potential_mask=mask, failures=failures,
                            metrics=metrics, keep=keep)
