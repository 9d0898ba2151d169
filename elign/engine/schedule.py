"""Learning-rate schedules as multiplicative factors of the base LR, one call per optimizer step.

Used through ``torch.optim.lr_scheduler.LambdaLR``; the schedule objects hold only numbers so the
scheduler state dict loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math

from elign.engine.errors import check_int, check_range


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR factor at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / (warmup_steps + 1)``: the first step already has a non-zero LR
    (ELIGN's schedule starts at LR 0 and wastes its first update). Then half a cosine from 1 down
    to ``min_lr_ratio`` at ``total_steps``, clamped there afterwards (ELIGN's factor rises again
    after ``total_steps`` because the cosine is periodic).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Linear warmup then cosine decay to ``min_lr_ratio``; never LR 0."""

    def __init__(self, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> None:
        """
        Args:
            warmup_steps: optimizer steps of linear warmup.
            total_steps: optimizer step at which the decay ends; None = the trainer's total count.
            min_lr_ratio: final LR as a fraction of the base LR, in (0, 1].
        """
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.total_steps = check_int("total_steps", total_steps, 1, allow_none=True, none_means="the whole run")
        # (0, 1]: the LR must never reach 0
        self.min_lr_ratio = check_range("min_lr_ratio", min_lr_ratio, 0.0, 1.0, low_open=True)

    def bind(self, total_steps: int) -> "WarmupCosineSchedule":
        """Fill ``total_steps`` if it was left null."""
        if self.total_steps is None:
            self.total_steps = int(total_steps)
        return self

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            raise RuntimeError("WarmupCosineSchedule.total_steps is unset; call bind() first")
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class ConstantSchedule:
    """Linear warmup then a constant LR."""

    def __init__(self, warmup_steps: int) -> None:
        """
        Args:
            warmup_steps: optimizer steps of linear warmup.
        """
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)

    def bind(self, total_steps: int) -> "ConstantSchedule":
        return self

    def __call__(self, step: int) -> float:
        return (step + 1) / (self.warmup_steps + 1) if step < self.warmup_steps else 1.0
