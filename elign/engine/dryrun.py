"""What ``python run.py ... dry_run=true`` prints: the wiring of the built groups, one batch's shapes and
the policy's own description of that batch (see ``run.py``; nothing here writes a file).

A policy may define ``describe(batch) -> dict[str, value]``: keys such as ``outputs/<name>`` or
``losses/<name>``, values a shape (tuple of ints), a number or a short string. Without it a dry run
prints only the batch's shapes, found by walking dicts, lists, tuples, dataclasses and tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["describe_value", "report", "shapes", "target_name"]

#: Items of a list or tuple shown one by one before the rest are only counted.
MAX_ITEMS = 4
#: Longest repr of a string or other short value.
MAX_REPR = 60


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR - 3] + "..."


def _array(value: torch.Tensor | np.ndarray) -> str:
    dtype = str(value.dtype).removeprefix("torch.")
    return f"{tuple(int(n) for n in value.shape)} {dtype}"


def shapes(batch: Any, prefix: str = "") -> dict[str, str]:
    """``{path: description}`` of every leaf of ``batch``: ``"(1, 32, 33) int64"`` for a tensor or array,
    the repr of a short value (``'1crn'``, ``7``), ``list[N] of (shape) dtype`` for a list of same-shaped
    tensors; paths join keys with ``/`` (``inputs/res_type``), list items with their index."""
    key = prefix or "batch"
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return {key: _array(batch)}
    if isinstance(batch, Mapping):
        out: dict[str, str] = {}
        for k, v in batch.items():
            out.update(shapes(v, f"{prefix}/{k}" if prefix else str(k)))
        return out or {key: "{} (empty)"}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return shapes({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, prefix)
    if isinstance(batch, (list, tuple)):
        kind = type(batch).__name__
        if not batch:
            return {key: f"{kind}[0]"}
        if all(isinstance(v, (torch.Tensor, np.ndarray)) for v in batch) and len({_array(v) for v in batch}) == 1:
            return {key: f"{kind}[{len(batch)}] of {_array(batch[0])}"}
        if all(isinstance(v, (str, int, float, bool)) or v is None for v in batch):
            return {key: f"{kind}[{len(batch)}] {_short(list(batch[:MAX_ITEMS]))}" + (" ..." if len(batch) > MAX_ITEMS else "")}
        out = {}
        for i, v in enumerate(batch[:MAX_ITEMS]):
            out.update(shapes(v, f"{prefix}/{i}" if prefix else str(i)))
        if len(batch) > MAX_ITEMS:
            out[f"{prefix}/..." if prefix else "..."] = f"{len(batch) - MAX_ITEMS} more of {kind}[{len(batch)}]"
        return out
    if isinstance(batch, (str, int, float, bool)) or batch is None:
        return {key: _short(batch)}
    return {key: type(batch).__name__}


def describe_value(value: Any) -> str:
    """One value of a policy's ``describe``: a shape as ``(1, 32, 32)``, a float to 6 significant digits."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _array(value) if value.ndim else f"{float(value):.6g}"
    if isinstance(value, tuple) and all(isinstance(n, (int, np.integer)) for n in value):
        return str(tuple(int(n) for n in value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def target_name(obj: Any) -> str:
    """``module.Class`` of a built object (``null`` for a group left out)."""
    if obj is None:
        return "null"
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _table(rows: Mapping[str, str], indent: str = "  ") -> list[str]:
    width = max((len(k) for k in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows.items()]


def report(run_dir: str, wiring: Mapping[str, tuple[str | None, Any]], batch: Any,
           description: Mapping[str, Any] | None, describer: str | None = None) -> str:
    """The dry run's text.

    Args:
        run_dir: a line about the run directory (where a run would write; what it holds).
        wiring: ``{group: (the option picked, the built object)}``.
        batch: the batch drawn.
        description: the policy's ``describe(batch)``, or None when it has none.
        describer: the name of that method, for the heading.
    """
    lines = ["dry run: every group built, one batch drawn; nothing trained, nothing written", f"run directory: {run_dir}",
             "wiring:"]
    lines += _table({group: f"{choice or 'null'} -> {target_name(obj)}" for group, (choice, obj) in wiring.items()})
    batch_rows = shapes(batch)
    lines += ["batch:", *_table(batch_rows)]
    if description is not None:
        rows = {k: describe_value(v) for k, v in description.items()}
        # the batch's own entries were printed above with their dtypes: only what differs or is new
        new = {k: v for k, v in rows.items() if k not in batch_rows or not batch_rows[k].startswith(v + " ")}
        lines += [f"policy.{describer}(batch) ({len(rows) - len(new)} batch entries as above):", *_table(new)]
    return "\n".join(lines)
