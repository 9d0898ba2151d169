"""Base vs post-trained EDM over several training and sampling seeds: paired changes, targets, tables.

A *pair* is one post-trained model (one training seed) and the base model, both sampled with the
same sampling seed (same node counts and initial noise), so the change of a metric is paired. A
training seed's figure is the median of its pairs' changes over the sampling seeds; the aggregate
is the median over all pairs, shown with the min-max range. The targets are checked on every
training seed's figure and on the aggregate: one lucky seed cannot pass the bench.

Metrics are those of :func:`elign.edm.evaluate.summarize_scores`. Fractions change in points
(``+2.0 pts``), everything else in percent of the base (``-15.0 %``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

# (metric key, label, scale, unit); a "%" unit marks a fraction whose change is in points.
ROWS = (("molecule_stability", "molecule stability", 100.0, "%"), ("atom_stability", "atom stability", 100.0, "%"),
        ("validity", "RDKit validity", 100.0, "%"), ("uniqueness", "uniqueness", 100.0, "%"),
        ("validity_x_uniqueness", "validity x uniqueness", 100.0, "%"),
        ("connected", "one fragment (validity is of the largest)", 100.0, "%"),
        ("fragments_per_molecule", "fragments per molecule", 1.0, ""),
        ("force_rms_ev_per_angstrom", "xTB force RMS, mean (eV/Å)", 1.0, ""),
        ("force_rms_median_ev_per_angstrom", "xTB force RMS, median (eV/Å)", 1.0, ""),
        ("force_rms_stable_ev_per_angstrom", "xTB force RMS, stable molecules (eV/Å)", 1.0, ""),
        ("energy_per_atom_ev", "xTB formation energy per atom (eV)", 1.0, ""),
        ("ff_failed_frac", "xTB failures", 100.0, "%"))
POINT_KEYS = frozenset(key for key, _, _, unit in ROWS if unit == "%")
# Columns of the per-pair table: (metric key, short header).
PAIR_COLUMNS = (("force_rms_median_ev_per_angstrom", "FRMS median"), ("force_rms_ev_per_angstrom", "FRMS mean"),
                ("force_rms_stable_ev_per_angstrom", "FRMS stable"), ("molecule_stability", "mol. stab."),
                ("atom_stability", "atom stab."), ("validity_x_uniqueness", "V x U"),
                ("connected", "one fragment"), ("fragments_per_molecule", "fragments/mol"))


@dataclass(frozen=True)
class Target:
    """A bound on a metric's change: ``change <= bound`` (``at_most``) or ``change >= bound``."""

    name: str
    key: str
    bound: float
    at_most: bool

    def holds(self, change: float) -> bool:
        """False for NaN (a metric that could not be computed never passes)."""
        if math.isnan(change):
            return False
        return change <= self.bound if self.at_most else change >= self.bound


TARGETS = (
    Target("median xTB force RMS -15 % or better", "force_rms_median_ev_per_angstrom", -15.0, True),
    Target("mean xTB force RMS -20 % or better", "force_rms_ev_per_angstrom", -20.0, True),
    Target("molecule stability not lower", "molecule_stability", 0.0, False),
    Target("atom stability at most 1 point lower", "atom_stability", -1.0, False),
    Target("one-fragment share not lower", "connected", 0.0, False),
    Target("fragments per molecule not higher", "fragments_per_molecule", 0.0, True),
    Target("validity x uniqueness at most 5 points lower", "validity_x_uniqueness", -5.0, False),
)


@dataclass(frozen=True)
class Pair:
    """One (training seed, sampling seed) comparison: metric -> change (points or percent)."""

    train_seed: int
    sample_seed: int
    changes: Mapping[str, float]


def metric_change(key: str, base: float, post: float) -> float:
    """Points (``100 * (post - base)``) for a fraction, else percent of ``|base|``; NaN if undefined."""
    if key in POINT_KEYS:
        return 100.0 * (post - base)
    return 100.0 * (post - base) / abs(base) if base != 0 else math.nan


def paired_changes(base: Mapping[str, float], post: Mapping[str, float]) -> dict[str, float]:
    """Every row metric's change from ``base`` to ``post``; a metric missing on either side is NaN."""
    return {key: metric_change(key, base[key], post[key]) if key in base and key in post else math.nan
            for key, _, _, _ in ROWS}


def _median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def per_train_seed(pairs: Sequence[Pair]) -> dict[int, dict[str, float]]:
    """Training seed -> metric -> median change over that seed's sampling seeds."""
    seeds = sorted({p.train_seed for p in pairs})
    return {s: {key: _median(p.changes[key] for p in pairs if p.train_seed == s) for key, *_ in ROWS} for s in seeds}


def aggregate(pairs: Sequence[Pair]) -> dict[str, tuple[float, float, float]]:
    """Metric -> (median, min, max) of the change over all pairs (NaN-free values only)."""
    out = {}
    for key, *_ in ROWS:
        vals = [p.changes[key] for p in pairs if not math.isnan(p.changes[key])]
        out[key] = (statistics.median(vals), min(vals), max(vals)) if vals else (math.nan,) * 3
    return out


def check_targets(changes: Mapping[str, float], targets: Sequence[Target] = TARGETS) -> dict[str, bool]:
    """Target name -> whether ``changes`` meets it."""
    return {t.name: t.holds(changes[t.key]) for t in targets}


def verdict(pairs: Sequence[Pair], targets: Sequence[Target] = TARGETS) -> dict[str, dict[str, bool]]:
    """``{"seed <t>": checks, ..., "aggregate": checks}``: PASS needs every check of every column."""
    out = {f"seed {s}": check_targets(c, targets) for s, c in per_train_seed(pairs).items()}
    out["aggregate"] = check_targets({k: v[0] for k, v in aggregate(pairs).items()}, targets)
    return out


def format_change(key: str, value: float) -> str:
    """``+2.0 pts`` for a fraction, ``-15.0 %`` otherwise, ``n/a`` for NaN."""
    if math.isnan(value):
        return "n/a"
    return f"{value:+.1f} pts" if key in POINT_KEYS else f"{value:+.1f} %"


def pairs_table(pairs: Sequence[Pair]) -> str:
    """One row per pair: the changes that the targets and the caveats are about."""
    lines = ["| training seed | sampling seed | " + " | ".join(h for _, h in PAIR_COLUMNS) + " |",
             "|---:|---:|" + "---:|" * len(PAIR_COLUMNS)]
    for p in sorted(pairs, key=lambda p: (p.train_seed, p.sample_seed)):
        cells = " | ".join(format_change(k, p.changes[k]) for k, _ in PAIR_COLUMNS)
        lines.append(f"| {p.train_seed} | {p.sample_seed} | {cells} |")
    return "\n".join(lines)


def values_table(base: Sequence[Mapping[str, float]], post: Sequence[Mapping[str, float]],
                 pairs: Sequence[Pair]) -> str:
    """Absolute values (median over the base's sampling seeds and over the post-trained pairs) and the
    change (median over pairs, with its min-max)."""
    agg = aggregate(pairs)
    lines = ["| metric | base | post-trained | change: median over pairs [min, max] |", "|---|---:|---:|---:|"]
    for key, name, scale, unit in ROWS:
        b, p = _median(m.get(key, math.nan) for m in base), _median(m.get(key, math.nan) for m in post)
        if math.isnan(b) and math.isnan(p):
            continue
        fmt = ".1f" if unit == "%" else ".3f"
        med, lo, hi = agg[key]
        spread = f"{format_change(key, med)} [{format_change(key, lo)}, {format_change(key, hi)}]"
        lines.append(f"| {name} | {b * scale:{fmt}}{unit} | {p * scale:{fmt}}{unit} | {spread} |")
    return "\n".join(lines)


def verdict_table(pairs: Sequence[Pair], targets: Sequence[Target] = TARGETS) -> str:
    """Targets x (each training seed, aggregate): the figure checked and PASS / FAIL."""
    columns = {**{f"seed {s}": c for s, c in per_train_seed(pairs).items()},
               "aggregate": {k: v[0] for k, v in aggregate(pairs).items()}}
    lines = ["| target | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for t in targets:
        cells = [f"{format_change(t.key, c[t.key])} {'PASS' if t.holds(c[t.key]) else 'FAIL'}" for c in columns.values()]
        lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
