"""Metrics: the always-on ``metrics.jsonl`` writer, phase timers, and optional external loggers."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """One JSON line per iteration in ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_from(self, iteration: int) -> None:
        """On resume, drop lines of iterations >= ``iteration`` (logged after the checkpoint that
        is being resumed), so the file holds each iteration exactly once."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", -1) < iteration]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
    return rows


class PhaseTimer:
    """Wall-clock seconds per named phase, reported as ``timing/<phase>``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


class NullLogger:
    """No external logger (``logger=none``); metrics.jsonl is still written."""

    run_id: str | None = None

    def start(self, run_dir: str, config: dict[str, Any], run_id: str | None) -> None:
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Weights & Biases, offline by default; the run id survives resume (stored in checkpoints)."""

    def __init__(self, project: str, entity: str | None, mode: str, tags: list[str] | None = None) -> None:
        """
        Args:
            project: W&B project name.
            entity: W&B entity (team/user); None = default.
            mode: "offline" (default, no network), "online" or "disabled"; WANDB_MODE overrides it.
            tags: run tags.
        """
        if mode not in ("offline", "online", "disabled"):
            from elign.engine.errors import ConfigError
            raise ConfigError("mode", mode, ["offline", "online", "disabled"])
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.run_id: str | None = None
        self._run = None

    def start(self, run_dir: str, config: dict[str, Any], run_id: str | None) -> None:
        import wandb  # optional dependency: imported only when this logger is chosen

        self._run = wandb.init(project=self.project, entity=self.entity, dir=run_dir, config=config,
                               mode=os.environ.get("WANDB_MODE", self.mode), tags=self.tags,
                               id=run_id, resume="allow" if run_id else None)
        self.run_id = self._run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
