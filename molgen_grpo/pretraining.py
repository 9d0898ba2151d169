"""Config glue for the pretraining job (``conf/experiment/molgen/pretrain.yaml``).

Two adapters, both thin, both because of how a Hydra config reaches the objects:

- :func:`packed_jsonl`: :class:`molgen_grpo.packing.PackedJsonl` whose ``paths`` may be ``package:``
  paths (``package:molgen_grpo/data/qm9_conformers/train.jsonl``), like the tokenizer's path. A run
  stays in its launch directory (``hydra.job.chdir: false``), so a relative path would name a
  different file from every other directory.
- :func:`wsds_schedule`: :class:`molgen_grpo.schedule.WSDSSchedule` under the keys of the trainer's
  default ``lr_schedule`` node. An experiment selects a schedule by replacing ``_target_``, but Hydra
  merges the experiment into ``conf/trainer/default.yaml`` and cannot delete keys, so the default's
  ``total_steps`` (an argument of ``WarmupCosineSchedule``) stays in the node. Here it keeps its
  meaning: the step at which the one decay ends when ``checkpoints`` is null. A run no longer than
  the warmup (a smoke run with ``trainer.max_iterations=1``) only warms up, as with the engine's
  ``WarmupCosineSchedule``; ``WSDSSchedule.bind`` would refuse it, naming ``checkpoints``, a key the
  user left null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from elign.engine.errors import ConfigError, check_int
from molgen_grpo.packing import MIN_EMBEDDED_CHARS, PackedJsonl
from molgen_grpo.schedule import WSDSSchedule
from molgen_grpo.tokenizer import resolve_path

__all__ = ["SHIPPED_DATA", "RunWSDSSchedule", "packed_jsonl", "wsds_schedule"]

SHIPPED_DATA = "package:molgen_grpo/data/qm9_conformers"  # built by scripts/build_molgen_data.py


def packed_jsonl(
    paths: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase | str,
    seq_len: int = 2048,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    lookahead: int = 100,
    min_embedded_chars: int = MIN_EMBEDDED_CHARS,
    infinite: bool = True,
) -> PackedJsonl:
    """:class:`PackedJsonl` over ``paths`` after resolving ``package:`` prefixes (other paths unchanged).

    Args: as :class:`PackedJsonl`; ``paths`` entries may be ``package:<package>/<path inside it>``.
    Raises:
        FileNotFoundError: a resolved path is not a file (the message names the path as given too).
    """
    given = [paths] if isinstance(paths, (str, Path)) else list(paths)
    resolved = [resolve_path(str(p)) for p in given]
    for raw, path in zip(given, resolved):
        if not Path(path).is_file():
            hint = " (build it with scripts/build_molgen_data.py)" if str(raw).startswith(SHIPPED_DATA) else ""
            raise FileNotFoundError(f"JSONL file not found: {raw} -> {path}{hint}")
    return PackedJsonl(resolved, tokenizer, seq_len=seq_len, seed=seed, shuffle_buffer=shuffle_buffer,
                       lookahead=lookahead, min_embedded_chars=min_embedded_chars, infinite=infinite)


class RunWSDSSchedule(WSDSSchedule):
    """:class:`WSDSSchedule` whose null ``checkpoints`` bind to the run's end, or just past the warmup
    for a run no longer than it (the LR then never leaves the warmup)."""

    def bind(self, total_steps: int) -> "RunWSDSSchedule":
        if self.checkpoints is None:
            self.checkpoints = [max(int(total_steps), self.warmup_steps + 1)]
        return self


def wsds_schedule(
    warmup_steps: int,
    checkpoints: Sequence[int] | None = None,
    decay_frac: float = 0.1,
    min_lr_ratio: float = 0.0,
    total_steps: int | None = None,
) -> RunWSDSSchedule:
    """A :class:`RunWSDSSchedule`; ``total_steps`` is the one checkpoint when ``checkpoints`` is null.

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
    return RunWSDSSchedule(warmup_steps, None if checkpoints is None else list(checkpoints), decay_frac, min_lr_ratio)
