"""Config glue for the pretraining job (``conf/experiment/molgen/pretrain.yaml``).

One adapter, because of how a Hydra config reaches the object:

- :func:`wsds_schedule`: :class:`molgen_grpo.schedule.WSDSSchedule` under the keys of the trainer's
  default ``lr_schedule`` node. An experiment selects a schedule by replacing ``_target_``, but Hydra
  merges the experiment into ``conf/trainer/default.yaml`` and cannot delete keys, so the default's
  ``total_steps`` (an argument of ``WarmupCosineSchedule``) stays in the node. Here it keeps its
  meaning: the step at which the one decay ends when ``checkpoints`` is null.
"""

from __future__ import annotations

from typing import Sequence

from elign.engine.errors import ConfigError, check_int
from molgen_grpo.packing import SHIPPED_DATA
from molgen_grpo.schedule import WSDSSchedule

__all__ = ["SHIPPED_DATA", "wsds_schedule"]


def wsds_schedule(
    warmup_steps: int,
    checkpoints: Sequence[int] | None = None,
    decay_frac: float = 0.1,
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
) -> WSDSSchedule:
    """A :class:`WSDSSchedule`; ``total_steps`` is the one checkpoint when ``checkpoints`` is null.

    Args:
        warmup_steps, checkpoints, decay_frac, min_lr_ratio: as :class:`WSDSSchedule`.
        total_steps: with ``checkpoints`` null, the optimizer step at which the single decay ends;
            null = the run's last step (the trainer binds it). Must be null when ``checkpoints`` is set.
    Raises:
        ConfigError: ``total_steps`` together with ``checkpoints``, or a bad value of either.
    """
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if total_steps is not None:
        total_steps = check_int("total_steps", total_steps, warmup_steps + 1,
                                allowed=f"null, or an integer > warmup_steps={warmup_steps}")
        if checkpoints is not None:
            raise ConfigError("total_steps", total_steps, "null when checkpoints is set (the last checkpoint "
                                                          "ends the schedule)")
        checkpoints = [total_steps]
    return WSDSSchedule(warmup_steps, None if checkpoints is None else list(checkpoints), decay_frac, min_lr_ratio)
