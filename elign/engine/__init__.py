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
    StepLogProbs,
)
from elign.engine.strategies.base import BatchCounts, LossInputs, RLStrategy, ScoredRewards, SupervisedStrategy

__all__ = [
    "BatchCounts",
    "ConfigError",
    "LossInputs",
    "RLStrategy",
    "ScoredRewards",
    "StepLogProbs",
    "SupervisedStrategy",
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
