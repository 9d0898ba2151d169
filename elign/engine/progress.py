"""Iteration progress for rank 0: a tqdm bar on a terminal, plain lines in a log file.

A redirected batch job (``python run.py > log 2>&1``, every cluster job) would otherwise get
tqdm's carriage-return redraws, thousands per run and unreadable with ``less`` or ``grep``. When
the stream is not a terminal, :class:`Progress` prints one line every ``max(1, total // lines)``
iterations and at the last one, with the key metrics, the seconds per iteration and an ETA.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Sequence, TextIO

from tqdm.auto import tqdm

#: Metrics shown next to the bar / on each line, when the iteration logged them.
KEY_METRICS = ("reward/total", "train/loss", "train/clip_frac")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """What the trainer calls: ``start(total, initial)``, ``update(iteration, metrics)`` after
    each iteration, ``write(message)`` for one-off lines, ``close()`` at the end.

    Args:
        show: display progress at all (the trainer's ``progress`` key).
        is_main: this process is rank 0; on other ranks every call is a no-op.
        stream: where to write; None = ``sys.stderr`` at ``start`` (tqdm's default stream).
        desc: label of the bar / of each line.
        lines: plain mode prints about this many progress lines per run.
        keys: metrics to show.
    """

    def __init__(self, show: bool, is_main: bool = True, stream: TextIO | None = None, desc: str = "iterations",
                 lines: int = 20, keys: Sequence[str] = KEY_METRICS) -> None:
        if int(lines) < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        self.show, self.is_main, self.desc = bool(show), bool(is_main), desc
        self.lines, self.keys = int(lines), tuple(keys)
        self._stream = stream
        self._bar: Any = None
        self.total = self.initial = self.every = 0
        self._t0 = 0.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def is_terminal(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            return False

    def start(self, total: int, initial: int = 0) -> None:
        """Iterations ``initial .. total - 1`` are about to run (``initial`` > 0 after a resume)."""
        self.total, self.initial = int(total), int(initial)
        self.every = max(1, self.total // self.lines)
        self._t0 = time.perf_counter()
        if self.show and self.is_main and self.is_terminal:
            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, dynamic_ncols=True,
                             file=self.stream)

    def _shown(self, metrics: Mapping[str, Any]) -> dict[str, str]:
        out = {}
        for key in self.keys:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = f"{value:.4g}"
        return out

    def update(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """Iteration ``iteration`` (0-based) has finished with ``metrics``."""
        if not (self.show and self.is_main):
            return
        shown = self._shown(metrics)
        if self._bar is not None:
            self._bar.set_postfix({k.split("/")[-1]: v for k, v in shown.items()}, refresh=False)
            self._bar.update(iteration + 1 - self._bar.n)
            return
        done = iteration + 1
        if done % self.every and done != self.total:
            return
        per_iteration = (time.perf_counter() - self._t0) / max(done - self.initial, 1)
        parts = [f"{self.desc} {done}/{self.total}", *(f"{k}={v}" for k, v in shown.items()),
                 f"| {per_iteration:.3g} s/it, eta {_duration(per_iteration * (self.total - done))}"]
        self.write(" ".join(parts))

    def write(self, message: str) -> None:
        """One line on rank 0 (also when ``show`` is off), above the bar if there is one."""
        if not self.is_main:
            return
        if self._bar is not None:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
