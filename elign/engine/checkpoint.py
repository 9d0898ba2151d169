"""Atomic checkpoints, RNG capture, and the latest/best bookkeeping of a run directory."""

from __future__ import annotations

import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elign.engine.errors import ConfigError, check_int

LATEST = "checkpoint_latest.pth"
BEST = "checkpoint_best.pth"
#: What a trainer checkpoint must hold to be resumed (see ``Trainer._state``).
RESUME_KEYS = ("iteration", "optimizer_steps", "model", "optimizer", "scheduler", "rng")
#: The temporary files of :func:`atomic_save` for the run directory's checkpoints: ``mkstemp``'s
#: ``.<name>.<8 random characters>.tmp``. A kill between mkstemp and the rename leaves one behind.
_STALE_TEMPORARY = re.compile(r"\.(%s|%s)\.[A-Za-z0-9_]{8}\.tmp" % (re.escape(LATEST), re.escape(BEST)))


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``,
    so a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint gets a normal file's mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary code from the file); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or one holding pickled objects
        raise RuntimeError(f"cannot load checkpoint {path}: {exc}") from exc


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that a process killed inside :func:`atomic_save` left in
    ``run_dir`` (only names of the ``atomic_save`` pattern for ``checkpoint_latest.pth`` /
    ``checkpoint_best.pth``). Only safe while holding the run directory's lock (no live writer
    can own them). Returns the deleted paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = [p for p in run_dir.iterdir() if _STALE_TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def check_resume(run_dir: str | Path, resume: str | None, key: str = "trainer.resume") -> Path | None:
    """The checkpoint a run will resume from (as :meth:`CheckpointManager.resolve_resume`), after
    checking that it is a readable trainer checkpoint; a missing, empty, truncated or foreign file
    is a :class:`ConfigError` naming ``key`` and the file. Tensors are memory-mapped, not read, so
    this costs little more than opening the archive."""
    try:
        path = CheckpointManager(run_dir, 1, None, "max", enabled=False).resolve_resume(resume)
    except FileNotFoundError:
        target = Path(str(resume))
        target = target / LATEST if target.is_dir() else target
        raise ConfigError(key, resume, f"null, auto, or an existing checkpoint file (no file {target})") from None
    if path is None:
        return None
    if path.stat().st_size == 0:
        raise ConfigError(key, resume, f"a readable trainer checkpoint; {path} is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - empty, truncated, random bytes, pickled objects: all "unreadable"
        raise ConfigError(key, resume, f"a readable trainer checkpoint; cannot load {path}: {_first_line(exc)}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(key, resume, f"a trainer checkpoint; {path} lacks {', '.join(missing)} "
                                       "(a weights-only file is a model's starting weights, not a run to resume)")
    return path


def missing_best_warning(run_dir: str | Path, best_metric: str | None) -> str | None:
    """The warning for a run that configured ``best_metric`` but has no ``checkpoint_best.pth``
    (None when there is nothing to warn about). Call it on the rank that writes the files."""
    if not best_metric or (Path(run_dir) / BEST).is_file():
        return None
    return (f"warning: trainer.best_metric={best_metric!r} was never logged with a finite value; "
            f"no best checkpoint in {run_dir}")


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors / plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached), "kind": str(kind)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Writes ``checkpoint_latest.pth`` every ``save_interval`` iterations and at the end, and
    ``checkpoint_best.pth`` whenever ``best_metric`` improves in ``best_mode`` direction."""

    def __init__(self, run_dir: str | Path, save_interval: int, best_metric: str | None, best_mode: str,
                 enabled: bool = True) -> None:
        if best_mode not in ("max", "min"):
            raise ConfigError("best_mode", best_mode, ("max", "min"))
        self.run_dir = Path(run_dir)
        self.save_interval = check_int("save_interval", save_interval, 1)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.enabled = enabled
        self.best_value: float | None = None

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``None`` -> no resume; ``"auto"`` -> this run directory's latest checkpoint if present;
        anything else is a path that must exist."""
        if resume is None:
            return None
        if resume == "auto":
            path = self.run_dir / LATEST
            return path if path.is_file() else None
        path = Path(resume)
        if path.is_dir():
            path = path / LATEST
        if not path.is_file():
            raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint at {path}")
        return path

    def improved(self, metrics: dict[str, float]) -> bool:
        if self.best_metric is None or self.best_metric not in metrics:
            return False  # e.g. an eval/ metric on an iteration without evaluation
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.best_mode == "max" else value < self.best_value

    def save(self, state: dict[str, Any], iteration: int, metrics: dict[str, float], last: bool) -> list[str]:
        """Save what is due after ``iteration`` (1-based count of finished iterations)."""
        written: list[str] = []
        if self.improved(metrics):
            self.best_value = float(metrics[self.best_metric])  # type: ignore[index]
            state = {**state, "best_value": self.best_value}
            if self.enabled:
                atomic_save(state, self.run_dir / BEST)
            written.append(BEST)
        state = {**state, "best_value": self.best_value}
        if last or (self.save_interval > 0 and iteration % self.save_interval == 0):
            if self.enabled:
                atomic_save(state, self.run_dir / LATEST)
            written.append(LATEST)
        return written
