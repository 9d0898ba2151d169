"""Errors that name the configuration key (or file and line) they come from."""

from __future__ import annotations

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
