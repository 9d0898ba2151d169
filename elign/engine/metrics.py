"""Metrics: the always-on ``metrics.jsonl`` writer, phase timers, and optional external loggers."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from elign.engine.errors import ConfigError, DataFormatError

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """One JSON line per iteration in ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_from(self, iteration: int) -> None:
        """On resume, drop lines of iterations >= ``iteration`` (logged after the checkpoint that
        is being resumed), so the file holds each iteration exactly once. A torn last line (the
        previous run was killed while writing it) is dropped with a warning."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in parse_metrics(self.path) if row.get("iteration", -1) < iteration]
        self._rewrite(kept)

    def reset(self) -> None:
        """Drop every line: a run that starts at iteration 0 (nothing to resume) must not append
        to the lines of an earlier attempt in the same directory."""
        if self.enabled and self.path.is_file():
            self._rewrite([])

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, self.path)

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def parse_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file, one per non-empty line.

    A malformed last line is what a kill in the middle of a write leaves behind: it is dropped
    with a warning naming the file. A malformed line before it is damage, not a torn write, and
    raises :class:`DataFormatError` with the file and line number."""
    lines = path.read_text().splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if k == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: dropping a torn last line (an interrupted write): {line[:80]!r}",
                              stacklevel=3)
                break
            raise DataFormatError(str(path), lineno, f"not a JSON object line ({exc})") from None
        rows.append(row)
    return rows


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``); see :func:`parse_metrics`."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return parse_metrics(path)


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

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A W&B table (the sample tables of :mod:`elign.engine.tables`)."""
        if self._run is not None:
            import wandb

            self._run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
