"""Supervised training (pretraining or SFT) through the same trainer: the domain's own loss."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class SupervisedStrategy:
    """Minimise ``policy.supervised_loss(batch)`` (e.g. EDM noise prediction, LoRA SFT)."""

    kind = "supervised"
    min_group_size = 1  # no groups: every batch element is a data point
    uses_kl = False

    def __init__(self, loss_scale: float = 1.0) -> None:
        """
        Args:
            loss_scale: multiplies the domain loss (1 = as defined by the domain).
        """
        self.loss_scale = float(loss_scale)

    def loss(self, policy: Any, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """The domain's loss on ``batch`` and its diagnostics (logged as ``train/<name>``)."""
        loss, metrics = policy.supervised_loss(batch)
        return self.loss_scale * loss, metrics
