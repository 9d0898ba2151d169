"""Multi-seed evidence arithmetic on hand-computed cases: changes, per-seed medians, targets, tables."""

import math

import pytest

from elign.edm.evidence import (TARGETS, Pair, aggregate, check_targets, format_change, metric_change, paired_changes,
                                pairs_table, per_train_seed, values_table, verdict, verdict_table)

BASE = {"molecule_stability": 0.10, "atom_stability": 0.80, "validity_x_uniqueness": 0.50, "connected": 0.70,
        "fragments_per_molecule": 1.40, "force_rms_ev_per_angstrom": 8.0, "force_rms_median_ev_per_angstrom": 4.0}


def changes(**kw: float) -> dict[str, float]:
    """A full change dict: every target met by a margin, then ``kw`` on top."""
    out = paired_changes(BASE, BASE)
    out.update({"force_rms_median_ev_per_angstrom": -20.0, "force_rms_ev_per_angstrom": -30.0})
    out.update(kw)
    return out


def test_fractions_change_in_points_and_the_rest_in_percent():
    assert metric_change("molecule_stability", 0.10, 0.125) == pytest.approx(2.5)
    assert metric_change("force_rms_ev_per_angstrom", 8.0, 6.0) == pytest.approx(-25.0)
    assert metric_change("fragments_per_molecule", 1.40, 1.47) == pytest.approx(5.0)
    assert metric_change("energy_per_atom_ev", -5.0, -5.5) == pytest.approx(-10.0)  # percent of |base|
    assert math.isnan(metric_change("force_rms_ev_per_angstrom", 0.0, 1.0))


def test_paired_changes_marks_a_missing_metric_nan():
    out = paired_changes({"force_rms_ev_per_angstrom": 2.0}, {"force_rms_ev_per_angstrom": 1.0})
    assert out["force_rms_ev_per_angstrom"] == pytest.approx(-50.0)
    assert math.isnan(out["force_rms_stable_ev_per_angstrom"])


def test_each_target_at_its_bound_and_just_past_it():
    at_bound = {"force_rms_median_ev_per_angstrom": -15.0, "force_rms_ev_per_angstrom": -20.0, "molecule_stability": 0.0,
                "atom_stability": -1.0, "connected": 0.0, "fragments_per_molecule": 0.0, "validity_x_uniqueness": -5.0}
    assert all(check_targets(at_bound).values())
    past = {"force_rms_median_ev_per_angstrom": -14.9, "force_rms_ev_per_angstrom": -19.9, "molecule_stability": -0.1,
            "atom_stability": -1.1, "connected": -0.1, "fragments_per_molecule": 0.1, "validity_x_uniqueness": -5.1}
    assert not any(check_targets(past).values())
    assert not any(check_targets(dict.fromkeys(at_bound, math.nan)).values()), "an uncomputable metric never passes"


def test_per_seed_median_and_aggregate_over_pairs():
    pairs = [Pair(1, 0, changes(force_rms_median_ev_per_angstrom=-30.0)),
             Pair(1, 1, changes(force_rms_median_ev_per_angstrom=-10.0)),
             Pair(2, 0, changes(force_rms_median_ev_per_angstrom=-16.0)),
             Pair(2, 1, changes(force_rms_median_ev_per_angstrom=-40.0)),
             Pair(3, 0, changes(force_rms_median_ev_per_angstrom=-2.0))]  # a seed with one sampling seed
    seeds = per_train_seed(pairs)
    key = "force_rms_median_ev_per_angstrom"
    assert [seeds[s][key] for s in (1, 2, 3)] == [-20.0, -28.0, -2.0]
    assert aggregate(pairs)[key] == (-16.0, -40.0, -2.0)  # median of 5 values, min, max


def test_one_good_seed_cannot_pass_and_one_bad_seed_fails_the_bench():
    good = [Pair(s, t, changes()) for s in (1, 2, 3) for t in (0, 1)]
    assert all(all(c.values()) for c in verdict(good).values())
    fragmenting = good[:4] + [Pair(3, t, changes(fragments_per_molecule=8.0, connected=-10.0)) for t in (0, 1)]
    v = verdict(fragmenting)
    assert set(v) == {"seed 1", "seed 2", "seed 3", "aggregate"}
    assert all(v["seed 1"].values()) and all(v["aggregate"].values()), "the median over pairs hides one seed"
    assert not v["seed 3"]["fragments per molecule not higher"] and not v["seed 3"]["one-fragment share not lower"]
    assert [t.name for t in TARGETS] == list(v["seed 3"])


def test_tables_show_every_pair_and_the_range():
    pairs = [Pair(1, 0, changes(molecule_stability=2.0)), Pair(2, 0, changes(molecule_stability=-1.0))]
    text = pairs_table(pairs)
    assert text.count("\n") == 3 and "| 2 | 0 |" in text and "-1.0 pts" in text
    post = [dict(BASE, molecule_stability=0.12), dict(BASE, molecule_stability=0.09)]
    values = values_table([BASE], post, pairs)
    row = next(line for line in values.splitlines() if line.startswith("| molecule stability"))
    assert row == "| molecule stability | 10.0% | 10.5% | +0.5 pts [-1.0 pts, +2.0 pts] |"
    verdicts = verdict_table(pairs)
    assert "| molecule stability not lower | +2.0 pts PASS | -1.0 pts FAIL | +0.5 pts PASS |" in verdicts
    assert format_change("force_rms_ev_per_angstrom", math.nan) == "n/a"
