"""Training strategies: advantages + loss (RL), or a supervised loss, as pure tensor math."""

from elign.engine.strategies.fed_grpo import FedGRPOStrategy
from elign.engine.strategies.grpo import GRPOStrategy
from elign.engine.strategies.supervised import SupervisedStrategy

__all__ = ["FedGRPOStrategy", "GRPOStrategy", "SupervisedStrategy"]
