"""Sample tables: every N iterations, what the policy wrote and what it was paid for.

One JSONL file per table, ``<run_dir>/samples/iteration_<i>.jsonl``, a row per sample: its group,
the prompt and completion when the rollout carries text (``rollout.info["prompts"]`` /
``["completions"]``), every reward channel after the engine's bookkeeping (failures already the
penalty), whether the channel failed, ``keep`` and the advantage (the mean over the sample's trained
steps: its one advantage under terminal strategies). The logger gets the same rows
(``log_table``, a W&B table) when it has one. The answer to "why is the loss 0?" is usually there:
a table whose groups all have one reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from elign.engine.errors import check_int
from elign.engine.rollout import Rollout
from elign.engine.strategies.base import ScoredRewards


def sample_rows(rollout: Rollout, scored: ScoredRewards, advantages: Tensor, max_rows: int) -> list[dict[str, Any]]:
    """The first ``max_rows`` samples as flat rows (``advantages`` is ``[B, T]``)."""
    mask = rollout.step_mask.to(advantages.device).float()
    adv = (advantages.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    texts = {key: rollout.info[key] for key in ("prompts", "completions") if key in rollout.info}
    rows = []
    for i in range(min(rollout.batch_size, max_rows)):
        row: dict[str, Any] = {"sample": i, "group": int(rollout.group_ids[i])}
        row.update({key.removesuffix("s"): str(values[i]) for key, values in texts.items()})
        for name, values in scored.channels.items():
            row[f"reward/{name}"] = float(values[i])
            if name in scored.failed:
                row[f"failed/{name}"] = bool(scored.failed[name][i])
        row.update(keep=bool(scored.keep[i]), advantage=float(adv[i]))
        rows.append(row)
    return rows


class SampleTable:
    """Writes a sample table every ``interval`` iterations (rank 0); ``interval`` 0 = never."""

    def __init__(self, run_dir: str | Path, interval: int, max_rows: int, enabled: bool) -> None:
        """
        Args:
            run_dir: the run directory (tables go to its ``samples/``).
            interval: iterations between tables (the first at iteration 0); 0 = off.
            max_rows: samples per table (the first ones, whole groups first).
            enabled: False on ranks other than 0.
        """
        self.dir = Path(run_dir) / "samples"
        self.interval = check_int("sample_table_interval", interval, 0)
        self.max_rows = check_int("sample_table_rows", max_rows, 1)
        self.enabled = enabled

    def due(self, iteration: int) -> bool:
        return self.enabled and self.interval > 0 and iteration % self.interval == 0

    def __call__(self, iteration: int, rollout: Rollout, scored: ScoredRewards, advantages: Tensor, logger: Any) -> None:
        if not self.due(iteration):
            return
        with torch.no_grad():
            rows = sample_rows(rollout, scored, advantages, self.max_rows)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"iteration_{iteration:06d}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(path)  # a crash never leaves half a table
        log_table = getattr(logger, "log_table", None)
        if callable(log_table) and rows:
            log_table("samples", list(rows[0]), [list(r.values()) for r in rows], iteration)
