"""The domain-free RL / SFT engine: contracts, strategies, trainer, checkpoints, metrics.

Nothing in this package imports a domain (``elign.edm``, ``boltz_ft``, ``molgen_grpo``).
"""

from elign.engine.errors import ConfigError, DataFormatError
from elign.engine.rollout import (
    ConstantReward,
    Filter,
    IdentityFilter,
    Policy,
    PromptSource,
    Reward,
    RewardOutput,
    Rollout,
)

__all__ = [
    "ConfigError",
    "ConstantReward",
    "DataFormatError",
    "Filter",
    "IdentityFilter",
    "Policy",
    "PromptSource",
    "Reward",
    "RewardOutput",
    "Rollout",
]
