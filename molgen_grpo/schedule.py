"""3DMolGen's WSDS learning-rate schedule (spec §1.5) as a factor of the base LR per optimizer step.

WSDS = warmup, stable, decay, then stable again: a linear warmup, then for each checkpoint ``T`` the LR
stays at its peak and decays linearly over the last ``decay_frac * T`` steps before ``T``; after ``T``
it jumps back to the peak, and after the last checkpoint it stays at the minimum. One run thus yields
an annealed checkpoint at every ``T`` (the "WSD-S" of Wen et al., 2024: decay, then resume at the
peak from the decayed weights). The current 3DMolGen run: 500 warmup steps, checkpoints 30k, 60k,
..., 150k, ``decay_frac`` 0.1, ``lr_min`` 0.

Steps are 0-based optimizer updates, as in ``elign.engine.schedule``: ``wsds_factor(s)`` is the LR
factor of update ``s``, and "checkpoint T" is the model after ``T`` updates (updates ``0 .. T-1``).
Compared with 3DMolGen's ``WSDSSchedule.get_lr``:

- the warmup is ``(s + 1) / (W + 1)`` (the engine's convention: the first update already learns),
  where 3DMolGen uses ``s / W`` and spends update 0 at LR 0;
- on the decay window ``[a, T)``, ``a = max(W, T - D)``, ``D = max(1, floor(decay_frac * T))``, the
  factor is 3DMolGen's ``1 - (1 - m) (s - a) / (T - a)``; it would reach ``m`` at ``s = T``, but update
  ``T`` already belongs to the next stable phase (3DMolGen spends it at ``lr_min``, so with
  ``lr_min = 0`` one update per checkpoint is wasted and its checkpoint T never sees the minimum
  either).

The object has the engine's schedule interface (``bind(total_steps)``, ``__call__(step)``, numbers
only), so it plugs into ``trainer.lr_schedule`` as is; it could move verbatim into
``elign/engine/schedule.py`` (it imports nothing from the domain).
"""

from __future__ import annotations

import math
from typing import Sequence

from elign.engine.errors import ConfigError, check_int, check_range

__all__ = ["WSDSSchedule", "decay_start", "wsds_factor"]


def decay_start(checkpoint: int, warmup_steps: int, decay_frac: float) -> int:
    """First update of the decay before ``checkpoint``: ``max(W, T - D)``, ``D = max(1, floor(f T))``
    (no decay, i.e. ``T``, when ``decay_frac`` is 0)."""
    if decay_frac == 0:
        return checkpoint
    # + 1e-9: 0.29 * 100 is 28.999999999999996 in floating point, and 29 steps are meant
    length = max(1, math.floor(decay_frac * checkpoint + 1e-9))
    return max(warmup_steps, checkpoint - length)


def wsds_factor(step: int, warmup_steps: int, checkpoints: Sequence[int], decay_frac: float,
                min_lr_ratio: float) -> float:
    """LR factor of optimizer update ``step`` (0-based); see the module docstring.

    Args:
        step: the update's index.
        warmup_steps: ``W``, updates of linear warmup.
        checkpoints: increasing update counts ``T`` (> ``W``) at which an annealed model is saved.
        decay_frac: share of ``T`` decayed before each checkpoint, in [0, 1].
        min_lr_ratio: ``m``, lowest LR as a fraction of the peak, in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    for checkpoint in checkpoints:
        if step < checkpoint:
            start = decay_start(checkpoint, warmup_steps, decay_frac)
            if step < start:
                return 1.0
            return 1.0 - (1.0 - min_lr_ratio) * (step - start) / (checkpoint - start)
    return min_lr_ratio


class WSDSSchedule:
    """Warmup, then stable / decay phases ending at each checkpoint, then the minimum LR."""

    def __init__(self, warmup_steps: int, checkpoints: Sequence[int] | None, decay_frac: float = 0.1,
                 min_lr_ratio: float = 0.0) -> None:
        """
        Args:
            warmup_steps: optimizer steps of linear warmup (first step already > 0).
            checkpoints: increasing optimizer-step counts, each > ``warmup_steps``, at which the LR has
                decayed (save the model there); None = one decay ending at the run's last step.
            decay_frac: share of each checkpoint's step count spent decaying before it, in [0, 1].
            min_lr_ratio: LR at the end of each decay and after the last checkpoint, as a fraction of
                the peak LR, in [0, 1] (3DMolGen: 0).
        """
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.decay_frac = check_range("decay_frac", decay_frac, 0.0, 1.0)
        self.min_lr_ratio = check_range("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        self.checkpoints: list[int] | None = None if checkpoints is None else self._check(list(checkpoints))

    def _check(self, checkpoints: list[int]) -> list[int]:
        allowed = f"a non-empty increasing list of integers > warmup_steps={self.warmup_steps}, or null"
        if not checkpoints:
            raise ConfigError("checkpoints", checkpoints, allowed)
        values = [check_int("checkpoints", c, self.warmup_steps + 1, allowed=allowed) for c in checkpoints]
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ConfigError("checkpoints", checkpoints, allowed)
        return values

    def bind(self, total_steps: int) -> "WSDSSchedule":
        """Fill ``checkpoints`` with ``[total_steps]`` if it was left null; a run no longer than the
        warmup (a smoke run) gets the step just past it, so it only warms up, as with the engine's
        ``WarmupCosineSchedule``."""
        if self.checkpoints is None:
            self.checkpoints = self._check([max(int(total_steps), self.warmup_steps + 1)])
        return self

    def __call__(self, step: int) -> float:
        if self.checkpoints is None:
            raise RuntimeError("WSDSSchedule.checkpoints is unset; call bind() first")
        return wsds_factor(step, self.warmup_steps, self.checkpoints, self.decay_frac, self.min_lr_ratio)
