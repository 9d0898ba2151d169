"""One writer per run directory, and no silent mixing of a new run with an old one.

Two processes started into the same directory would interleave ``metrics.jsonl`` and overwrite
each other's checkpoints and config. :class:`RunDirectory` takes an exclusive ``flock`` on
``<run_dir>/.run.lock`` for as long as the run lives: the kernel drops it when the process exits
or is killed, so a crash never leaves a stale lock (the file itself stays; an unlocked file means
nothing). The lock file descriptor is not inherited by child processes (Python opens files
non-inheritable), so force-field workers that outlive a killed trainer do not hold it.

Under the lock, :meth:`RunDirectory.claim` decides what the directory may hold:

- a fresh run (``resume`` null, or a checkpoint from another directory) needs a directory without
  run files, or ``overwrite`` (which deletes them first);
- a run that continues this directory (``resume=auto`` or a checkpoint inside it) keeps its files
  but the acceptance verdict (``acceptance.json``, written again at the end); with ``auto`` and no
  checkpoint yet it starts at iteration 0, so the lines an earlier attempt logged are dropped;
- in every case, temporaries of checkpoint writes killed half-way are deleted (safe: the lock
  guarantees no live writer owns them).

Only rank 0 creates a :class:`RunDirectory`; other ranks write nothing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from elign.engine.acceptance import ACCEPTANCE_FILE
from elign.engine.checkpoint import BEST, LATEST, remove_stale_temporaries
from elign.engine.errors import ConfigError, RunDirectoryError
from elign.engine.metrics import METRICS_FILE, MetricsWriter

LOCK_FILE = ".run.lock"
CONFIG_FILE = "config.yaml"
#: Files that make a directory "hold a run", and that ``overwrite`` deletes. Plots (curves.png) are
#: outputs of a run too: a new run must not leave the old run's pictures next to its numbers, nor
#: the old run's acceptance verdict.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, LATEST, BEST, "curves.png", "molecules.png", ACCEPTANCE_FILE)
#: Of these, the ones whose presence means a run was started here.
_EVIDENCE = (CONFIG_FILE, METRICS_FILE, LATEST, BEST)


class RunDirectory:
    """Exclusive ownership of a run directory by this process (a context manager).

    Args:
        path: the run directory (created if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    @property
    def locked(self) -> bool:
        return self._file is not None

    def lock(self) -> None:
        """Take the directory's lock or raise :class:`RunDirectoryError` if another process holds it."""
        if self._file is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunDirectoryError(str(self.path), f"another process{f' (pid {holder})' if holder else ''} is "
                                    "running in it; wait for it to finish or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")  # for the message above; the lock itself is the flock
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunDirectory":
        self.lock()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def run_files(self) -> list[str]:
        """Names of the files in the directory that show a run was started there."""
        return [name for name in _EVIDENCE if (self.path / name).exists()]

    def continues(self, resume: str | None) -> bool:
        """Whether ``resume`` continues the run of this directory (rather than starting a new one)."""
        if resume is None:
            return False
        if resume == "auto":
            return True
        here = self.path.resolve()
        target = Path(resume).expanduser().resolve()
        return target == here or here in target.parents

    def check(self, resume: str | None, overwrite: bool) -> None:
        """The refusals of :meth:`claim`, read-only (no lock needed, the directory need not exist; a dry run
        uses it): ``overwrite`` with a resume of this directory's run, or a fresh run into a directory that
        holds one without ``overwrite``.

        Raises:
            ConfigError: ``overwrite`` together with a resume of this directory's run.
            RunDirectoryError: a fresh run into a directory that holds one, without ``overwrite``.
        """
        if self.continues(resume):
            if overwrite:
                raise ConfigError("overwrite", True, "false when trainer.resume continues this directory's run")
            return
        present = self.run_files()
        if present and not overwrite:
            raise RunDirectoryError(str(self.path), f"already holds a run ({', '.join(present)}); set "
                                    "trainer.resume=auto to continue it, overwrite=true to replace it, "
                                    "or choose another hydra.run.dir")

    def claim(self, resume: str | None, overwrite: bool) -> list[str]:
        """Make the directory ready for a run (see the module docstring); needs the lock.

        Args:
            resume: the trainer's resume setting (null, "auto" or a checkpoint path).
            overwrite: delete an earlier run's files instead of refusing to start.

        Returns:
            Names of the files deleted (earlier run files with ``overwrite``, stale temporaries).

        Raises:
            RunDirectoryError: a fresh run into a directory that holds one, without ``overwrite``.
            ConfigError: ``overwrite`` together with a resume of this directory's run.
        """
        if not self.locked:
            raise RuntimeError("RunDirectory.claim needs the lock (call lock() first)")
        self.check(resume, overwrite)
        removed = [p.name for p in remove_stale_temporaries(self.path)]
        (self.path / (METRICS_FILE + ".tmp")).unlink(missing_ok=True)  # a rewrite of metrics.jsonl cut short
        (self.path / (ACCEPTANCE_FILE + ".tmp")).unlink(missing_ok=True)  # a verdict's write cut short
        if self.continues(resume):
            if (self.path / ACCEPTANCE_FILE).is_file():  # it judged the run as it was; a new one comes at the end
                (self.path / ACCEPTANCE_FILE).unlink()
                removed.append(ACCEPTANCE_FILE)
            if resume == "auto" and not (self.path / LATEST).is_file():
                MetricsWriter(self.path).reset()  # starts at iteration 0: an earlier attempt's lines go
            return removed
        if overwrite:
            for name in RUN_FILES:
                if (self.path / name).is_file():
                    (self.path / name).unlink()
                    removed.append(name)
        return removed
