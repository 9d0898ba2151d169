"""Acceptance report: pass/fail checks on a finished run's ``metrics.jsonl``, for any domain.

A run that "finished" is not yet a run that trained: its loss may have gone NaN, may have climbed,
or (RL) every group may have scored its samples alike, so that no advantage and no gradient was
left. :class:`AcceptanceReport` turns these into explicit checks with a value, a threshold and a
verdict, written atomically to ``<run_dir>/acceptance.json``::

    {"passed": true, "iterations": 35,
     "checks": {"max_nan": {"value": 0, "threshold": 0, "passed": true, "metrics": [...]}, ...}}

It reads the metrics file only, so it needs no model, and it judges the whole run: a resumed run's
``metrics.jsonl`` holds every iteration once. ``run.py`` calls it on rank 0 after ``fit()``, prints
:func:`summary_line` and, with ``fail_exit``, ends the process with :data:`FAILED_EXIT_CODE`.

A check whose value cannot be computed (fewer than two finite losses for a slope, a metric the run
never logged) fails: a gate that could not look must not wave the run through.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from elign.engine.errors import ConfigError, check_int, check_range
from elign.engine.metrics import METRICS_FILE, read_metrics

ACCEPTANCE_FILE = "acceptance.json"
#: Exit status of ``run.py`` when a check fails and ``acceptance.fail_exit`` is true (2 is a config
#: or start-up error, 1 an unexpected exception).
FAILED_EXIT_CODE = 3
#: Gradient norm before clipping, logged by every update path (``elign.engine.updates``).
GRAD_NORM_KEY = "train/grad_norm"
#: Mean over groups of the within-group std of the total reward (``elign.engine.bookkeeping``).
REWARD_STD_KEY = "rollout/reward_group_std"
#: Fraction of groups whose total reward has no spread (``elign.engine.bookkeeping``).
FLAT_GROUPS_KEY = "rollout/frac_reward_zero_std"


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is neither NaN nor ±inf (bools and ``None`` are not numbers).

    ``MetricsWriter`` writes a non-finite float as JSON ``null``, so a ``None`` read back from
    ``metrics.jsonl`` is a NaN or ±inf of the run; a ``NaN`` / ``Infinity`` token (another writer)
    parses to a non-finite float and is caught here too."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of training iterations (``iteration >= 0``): the evaluation of the starting weights
    is logged as iteration -1 and holds no loss."""
    return [r for r in rows if is_finite_number(r.get("iteration")) and r["iteration"] >= 0]


def count_non_finite(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> int:
    """Number of non-finite values of ``keys`` over ``rows``.

    Args:
        rows: metrics.jsonl rows (one dict per iteration).
        keys: metric names; a key absent from a row is not counted (that row did not log it), a key
            present with ``null`` / NaN / ±inf counts once.

    Returns:
        The count (an integer >= 0), over all rows and keys together.
    """
    return sum(1 for row in rows for key in keys if key in row and not is_finite_number(row[key]))


def loss_slope(values: Sequence[float | None], iterations: Sequence[float] | None = None) -> float:
    """Least-squares slope of ``values`` against ``iterations``, ignoring non-finite values.

    ``slope = Σ (x - x̄)(y - ȳ) / Σ (x - x̄)²`` over the pairs whose value is finite. A loss that
    trains goes down or stays flat: a positive slope means it climbed over the run.

    Args:
        values: ``[n]`` loss per iteration (in the loss's units); ``None`` / NaN / ±inf are skipped.
        iterations: ``[n]`` iteration of each value; default ``0 .. n-1``.

    Returns:
        Loss units per iteration; NaN with fewer than two finite values (or a single iteration).
    """
    xs = list(range(len(values))) if iterations is None else list(iterations)
    if len(xs) != len(values):
        raise ValueError(f"loss_slope: {len(values)} values but {len(xs)} iterations")
    pairs = [(float(x), float(y)) for x, y in zip(xs, values) if is_finite_number(y) and is_finite_number(x)]
    if len(pairs) < 2:
        return math.nan
    x_mean = sum(x for x, _ in pairs) / len(pairs)
    y_mean = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - x_mean) ** 2 for x, _ in pairs)
    if sxx == 0:
        return math.nan
    return sum((x - x_mean) * (y - y_mean) for x, y in pairs) / sxx


def mean_finite(values: Iterable[Any]) -> float:
    """Mean of the finite numbers in ``values`` (``None`` / NaN / ±inf skipped); NaN if there are none."""
    finite = [float(v) for v in values if is_finite_number(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _check(value: float | int, threshold: float | int, passed: bool, metrics: list[str]) -> dict[str, Any]:
    """One check's entry; a non-finite value is written as ``null`` (JSON has no NaN)."""
    return {"value": value if is_finite_number(value) else None, "threshold": threshold, "passed": bool(passed),
            "metrics": metrics}


class AcceptanceReport:
    """The ``acceptance`` config group: checks a finished run's metrics against thresholds."""

    def __init__(self, enabled: bool = False, max_nan: int = 0, max_loss_slope: float | None = None,
                 loss_key: str = "train/loss", min_reward_std: float | None = None,
                 max_flat_group_frac: float | None = None, fail_exit: bool = False) -> None:
        """
        Args (the YAML keys):
            enabled: run the checks after ``fit()`` and write ``acceptance.json`` (false: nothing).
            max_nan: most non-finite values allowed among ``loss_key`` and ``train/grad_norm`` over
                the run (a NaN loss usually poisons the weights, so the default is 0).
            max_loss_slope: the least-squares slope of ``loss_key`` per iteration must be <= this;
                None = check off. RL surrogate losses hover near 0, so 0.0 means "did not climb".
            loss_key: the metric the loss checks read (``train/loss`` for every engine strategy).
            min_reward_std: RL: the run's mean of ``rollout/reward_group_std`` (mean within-group std
                of the total reward) must be >= this; None = check off. Groups without spread give
                GRPO no advantage and no gradient.
            max_flat_group_frac: RL: the run's mean of ``rollout/frac_reward_zero_std`` (fraction of groups
                without reward spread) must be <= this, in [0, 1]; None = check off.
            fail_exit: ``run.py`` exits with status 3 when a check fails (CI gates); false only
                reports. In a Hydra sweep the first failing job ends the sweep.
        """
        for key, value in (("enabled", enabled), ("fail_exit", fail_exit)):
            if not isinstance(value, bool):
                raise ConfigError(key, value, "true or false")
        if not isinstance(loss_key, str) or not loss_key:
            raise ConfigError("loss_key", loss_key, "a metric name, e.g. train/loss")
        self.enabled, self.fail_exit, self.loss_key = enabled, fail_exit, loss_key
        self.max_nan = check_int("max_nan", max_nan, 0)
        self.max_loss_slope = check_range("max_loss_slope", max_loss_slope, allow_none=True, none_means="check off")
        self.min_reward_std = check_range("min_reward_std", min_reward_std, 0, allow_none=True,
                                          none_means="check off")
        self.max_flat_group_frac = check_range("max_flat_group_frac", max_flat_group_frac, 0, 1, allow_none=True,
                                               none_means="check off")

    def evaluate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The verdict on ``rows`` (metrics.jsonl rows): every enabled check and whether all pass."""
        train = training_rows(rows)
        nan_keys = [self.loss_key] + ([GRAD_NORM_KEY] if GRAD_NORM_KEY != self.loss_key else [])
        nans = count_non_finite(train, nan_keys)
        checks = {"max_nan": _check(nans, self.max_nan, nans <= self.max_nan, nan_keys)}
        if self.max_loss_slope is not None:
            logged = [r for r in train if self.loss_key in r]
            slope = loss_slope([r[self.loss_key] for r in logged], [r["iteration"] for r in logged])
            checks["max_loss_slope"] = _check(slope, self.max_loss_slope,
                                              math.isfinite(slope) and slope <= self.max_loss_slope, [self.loss_key])
        if self.min_reward_std is not None:
            spread = mean_finite(r.get(REWARD_STD_KEY) for r in train)
            checks["min_reward_std"] = _check(spread, self.min_reward_std,
                                              math.isfinite(spread) and spread >= self.min_reward_std, [REWARD_STD_KEY])
        if self.max_flat_group_frac is not None:
            flat = mean_finite(r.get(FLAT_GROUPS_KEY) for r in train)
            checks["max_flat_group_frac"] = _check(flat, self.max_flat_group_frac,
                                                   math.isfinite(flat) and flat <= self.max_flat_group_frac,
                                                   [FLAT_GROUPS_KEY])
        return {"passed": all(c["passed"] for c in checks.values()), "checks": checks, "iterations": len(train)}

    def __call__(self, run_dir: str | Path) -> dict[str, Any]:
        """Read ``<run_dir>/metrics.jsonl``, evaluate, write ``<run_dir>/acceptance.json``; returns the
        verdict. A run directory without metrics (no iteration ran) is judged on no rows."""
        run_dir = Path(run_dir)
        rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
        verdict = self.evaluate(rows)
        write_json_atomic(run_dir / ACCEPTANCE_FILE, verdict)
        return verdict


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path.tmp``, fsync, then rename over ``path``: a reader (or a kill)
    never sees half a verdict. Strict JSON: a NaN in ``obj`` raises instead of writing ``NaN``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _format(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_line(verdict: Mapping[str, Any]) -> str:
    """One line for the log, e.g. ``acceptance FAIL (35 iterations): max_nan PASS 0 <= 0;
    max_loss_slope FAIL 0.0123 <= 0``."""
    ops = {"max_nan": "<=", "max_loss_slope": "<=", "min_reward_std": ">=", "max_flat_group_frac": "<="}
    parts = [f"{name} {'PASS' if c['passed'] else 'FAIL'} {_format(c['value'])} {ops.get(name, 'vs')} "
             f"{_format(c['threshold'])}" for name, c in verdict["checks"].items()]
    return (f"acceptance {'PASS' if verdict['passed'] else 'FAIL'} ({verdict['iterations']} iterations): "
            + "; ".join(parts))
