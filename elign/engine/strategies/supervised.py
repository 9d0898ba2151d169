"""Supervised training (pretraining or SFT) through the same trainer: the domain's own loss."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from elign.engine.errors import ConfigError


class SupervisedStrategy:
    """Minimise ``policy.supervised_loss(batch)`` (e.g. EDM noise prediction, LoRA SFT); no reward,
    no filter and no groups are involved (the ``SupervisedStrategy`` protocol of ``base.py``)."""

    kind = "supervised"
    min_group_size = 1  # no groups: every batch element is a data point

    def __init__(self, loss_scale: float = 1.0) -> None:
        """
        Args:
            loss_scale: multiplies the domain loss (1 = as defined by the domain).
        """
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ConfigError("loss_scale", loss_scale, "a finite number > 0")
        self.loss_scale = float(loss_scale)

    def loss(self, policy: Any, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """The domain's loss on ``batch`` and its diagnostics (logged as ``train/<name>``)."""
        loss, metrics = policy.supervised_loss(batch)
        return self.loss_scale * loss, metrics
