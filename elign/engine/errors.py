"""Errors that name the configuration key (or file and line) they come from."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is the constructor argument; ``run.py`` prefixes the
    config group (``dataloader.group_size``) when it instantiates the group."""

    def __init__(self, key: str, value: Any, allowed: str | Iterable[Any]) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed if isinstance(allowed, str) else ", ".join(map(str, allowed))
        super().__init__(self._message())

    def _message(self) -> str:
        return f"invalid config value {self.key}={self.value!r}; allowed: {self.allowed}"

    def with_prefix(self, prefix: str) -> "ConfigError":
        """The same error with the key qualified by its config group, e.g. ``model.num_steps``."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


class DataFormatError(ValueError):
    """A malformed input file; the message names the file and the line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class RunDirectoryError(RuntimeError):
    """A run directory that cannot be used: another process writes it, or it holds a run that was
    neither resumed nor overwritten. The message names the directory."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"run directory {path}: {reason}")
        self.path, self.reason = path, reason


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_range(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False,
                allow_none: bool = False, none_means: str = "", allowed: str | None = None) -> Any:
    """``value`` if it is a finite number (an integer with ``integer``) inside the interval, else
    :class:`ConfigError` naming ``key``. NaN and ±inf are always rejected: a config key that
    means "off" says so with null (``allow_none``; ``none_means`` names what null does).
    ``allowed`` replaces the generated description of the allowed values in the message.

    Returns the value as ``int`` / ``float`` (``None`` when allowed and given)."""
    if value is None and allow_none:
        return None
    bounds = _interval(low, high, low_open, high_open)
    what = ("an integer" if integer else "a finite number") + (f" {bounds}" if bounds else "")
    if allow_none:
        what += f", or null{f' ({none_means})' if none_means else ''}"
    what = allowed or what
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(key, value, what)
    if integer and value != int(value):
        raise ConfigError(key, value, what)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(key, value, what)
    return int(value) if integer else float(value)


def check_finite(key: str, value: Any, *, allow_none: bool = False, none_means: str = "",
                 allowed: str | None = None) -> float | None:
    """``float(value)`` if it is a finite number, else :class:`ConfigError` naming ``key``."""
    return check_range(key, value, allow_none=allow_none, none_means=none_means, allowed=allowed)


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None, *,
              allow_none: bool = False, none_means: str = "", allowed: str | None = None) -> int | None:
    """``int(value)`` if it is an integer in ``[low, high]``, else :class:`ConfigError` naming ``key``
    (a float with an integral value, e.g. ``4.0`` from a YAML, is accepted)."""
    return check_range(key, value, low, high, integer=True, allow_none=allow_none, none_means=none_means,
                       allowed=allowed)
