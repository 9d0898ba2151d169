"""Acceptance report: the maths on hand-computed cases, NaN read back from metrics.jsonl, pass/fail,
the content of acceptance.json, its atomic write, config errors naming the key, and the run
directory dropping a stale verdict."""

import json
import math

import pytest

from elign.engine.acceptance import (ACCEPTANCE_FILE, FAILED_EXIT_CODE, FLAT_GROUPS_KEY, GRAD_NORM_KEY,
                                     REWARD_STD_KEY, AcceptanceReport, count_non_finite, loss_slope, mean_finite,
                                     summary_line, write_json_atomic)
from elign.engine.errors import ConfigError
from elign.engine.metrics import MetricsWriter
from elign.engine.rundir import RunDirectory

NAN, INF = float("nan"), float("inf")


def write_rows(run_dir, rows):
    writer = MetricsWriter(run_dir)
    for row in rows:
        writer.write(row)


# ---- the maths ---------------------------------------------------------------------------------

def test_loss_slope_hand_computed():
    assert loss_slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # x = 0, 1, 2 (mean 1), y = 3, 1, 2 (mean 2): Σ dx dy = (-1)(1) + 0 + (1)(0) = -1, Σ dx² = 2
    assert loss_slope([3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    # uneven iterations: y = (x - 10) / 10 exactly, so the slope is 0.1 per iteration
    assert loss_slope([0.0, 1.0, 3.0], [10, 20, 40]) == pytest.approx(0.1)
    assert loss_slope([5.0, 5.0, 5.0]) == 0.0


def test_loss_slope_ignores_non_finite_and_is_nan_without_two_points():
    # only (0, 1) and (2, 5) are finite: slope 4 / 2 = 2
    assert loss_slope([1.0, None, 5.0, NAN, INF], [0, 1, 2, 3, 4]) == pytest.approx(2.0)
    assert math.isnan(loss_slope([]))
    assert math.isnan(loss_slope([1.0, None, NAN]))
    assert math.isnan(loss_slope([1.0, 2.0], [3, 3]))  # one iteration: no slope
    with pytest.raises(ValueError, match="2 values but 3 iterations"):
        loss_slope([1.0, 2.0], [0, 1, 2])


def test_count_non_finite_counts_present_null_nan_and_inf_only():
    rows = [{"train/loss": 1.0, GRAD_NORM_KEY: None},  # 1 (null = a NaN written by MetricsWriter)
            {"train/loss": None},  # 1; the absent grad norm is not counted
            {"train/loss": NAN, GRAD_NORM_KEY: -INF},  # 2
            {"other": None}]  # a key that is not checked
    assert count_non_finite(rows, ["train/loss", GRAD_NORM_KEY]) == 4
    assert count_non_finite(rows, ["train/loss"]) == 2
    assert count_non_finite([], ["train/loss"]) == 0


def test_mean_finite_skips_non_finite():
    assert mean_finite([1.0, None, 3, NAN, INF]) == pytest.approx(2.0)
    assert math.isnan(mean_finite([None, NAN]))


# ---- the report --------------------------------------------------------------------------------

def test_nan_written_by_the_metrics_writer_is_counted_when_read_back(tmp_path):
    write_rows(tmp_path, [{"iteration": 0, "train/loss": NAN, GRAD_NORM_KEY: 1.0},
                          {"iteration": 1, "train/loss": 0.5, GRAD_NORM_KEY: INF},
                          {"iteration": 2, "train/loss": 0.4, GRAD_NORM_KEY: 1.0}])
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()  # written as null: strict JSON
    verdict = AcceptanceReport(enabled=True, max_nan=1)(tmp_path)
    assert verdict["checks"]["max_nan"] == {"value": 2, "threshold": 1, "passed": False,
                                            "metrics": ["train/loss", GRAD_NORM_KEY]}
    assert verdict["passed"] is False and verdict["iterations"] == 3
    assert AcceptanceReport(enabled=True, max_nan=2)(tmp_path)["passed"] is True


def test_every_check_passes_and_fails_on_its_threshold():
    # iteration -1 (the evaluation of the starting weights) is no training iteration
    rows = [{"iteration": -1, "eval/score": 1.0}] + [
        {"iteration": i, "train/loss": 1.0 - 0.1 * i, GRAD_NORM_KEY: 1.0, REWARD_STD_KEY: std, FLAT_GROUPS_KEY: flat}
        for i, (std, flat) in enumerate([(0.2, 0.0), (None, 0.5), (0.4, 0.25)])]
    # loss slope -0.1; mean reward std (0.2 + 0.4) / 2 = 0.3; mean flat-group fraction (0 + 0.5 + 0.25) / 3 = 0.25
    ok = AcceptanceReport(enabled=True, max_loss_slope=0.0, min_reward_std=0.3,
                          max_flat_group_frac=0.25).evaluate(rows)
    assert ok["passed"] is True and ok["iterations"] == 3
    assert ok["checks"]["max_loss_slope"]["value"] == pytest.approx(-0.1)
    assert ok["checks"]["min_reward_std"]["value"] == pytest.approx(0.3)
    assert ok["checks"]["max_flat_group_frac"]["value"] == pytest.approx(0.25)
    bad = AcceptanceReport(enabled=True, max_loss_slope=-0.2, min_reward_std=0.31,
                           max_flat_group_frac=0.2).evaluate(rows)
    assert bad["passed"] is False
    assert bad["checks"]["max_loss_slope"]["passed"] is False and bad["checks"]["min_reward_std"]["passed"] is False
    assert bad["checks"]["max_flat_group_frac"]["passed"] is False
    assert "max_flat_group_frac FAIL 0.25 <= 0.2" in summary_line(bad)
    assert bad["checks"]["max_nan"]["passed"] is True


def test_checks_that_are_off_are_absent_and_checks_that_cannot_be_computed_fail():
    rows = [{"iteration": 0, "train/loss": 1.0}]  # one loss: no slope; no reward spread (supervised)
    assert set(AcceptanceReport(enabled=True).evaluate(rows)["checks"]) == {"max_nan"}
    verdict = AcceptanceReport(enabled=True, max_loss_slope=0.0, min_reward_std=0.0).evaluate(rows)
    assert verdict["checks"]["max_loss_slope"] == {"value": None, "threshold": 0.0, "passed": False,
                                                   "metrics": ["train/loss"]}
    assert verdict["checks"]["min_reward_std"]["value"] is None and verdict["passed"] is False


def test_loss_key_picks_the_metric(tmp_path):
    rows = [{"iteration": i, "train/loss": 1.0, "train/nll": float(i), "train/grad_norm": 1.0} for i in range(3)]
    verdict = AcceptanceReport(enabled=True, max_loss_slope=0.5, loss_key="train/nll").evaluate(rows)
    assert verdict["checks"]["max_loss_slope"]["value"] == pytest.approx(1.0)
    assert verdict["checks"]["max_nan"]["metrics"] == ["train/nll", GRAD_NORM_KEY]


def test_acceptance_json_content(tmp_path):
    write_rows(tmp_path, [{"iteration": i, "train/loss": 2.0 - i, GRAD_NORM_KEY: 1.0} for i in range(4)])
    verdict = AcceptanceReport(enabled=True, max_loss_slope=0.0)(tmp_path)
    on_disk = json.loads((tmp_path / ACCEPTANCE_FILE).read_text())
    assert on_disk == verdict
    assert on_disk == {"passed": True, "iterations": 4, "checks": {
        "max_nan": {"value": 0, "threshold": 0, "passed": True, "metrics": ["train/loss", GRAD_NORM_KEY]},
        "max_loss_slope": {"value": -1.0, "threshold": 0.0, "passed": True, "metrics": ["train/loss"]}}}
    assert summary_line(verdict) == ("acceptance PASS (4 iterations): max_nan PASS 0 <= 0; "
                                     "max_loss_slope PASS -1 <= 0")


def test_a_run_directory_without_metrics_is_judged_on_no_rows(tmp_path):
    verdict = AcceptanceReport(enabled=True, max_loss_slope=0.0)(tmp_path)
    assert verdict["iterations"] == 0 and verdict["passed"] is False  # no loss, no slope
    assert "max_loss_slope FAIL n/a <= 0" in summary_line(verdict)


def test_write_is_atomic_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / ACCEPTANCE_FILE
    write_json_atomic(path, {"passed": True})
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything replaces the file
        write_json_atomic(path, {"passed": False, "value": NAN})
    assert json.loads(path.read_text()) == {"passed": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [ACCEPTANCE_FILE]


@pytest.mark.parametrize("kwargs,key", [
    ({"max_nan": -1}, "max_nan"), ({"max_nan": 0.5}, "max_nan"), ({"max_loss_slope": NAN}, "max_loss_slope"),
    ({"min_reward_std": -0.1}, "min_reward_std"), ({"max_flat_group_frac": 1.5}, "max_flat_group_frac"),
    ({"enabled": "yes"}, "enabled"), ({"fail_exit": 1}, "fail_exit"),
    ({"loss_key": ""}, "loss_key"),
])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        AcceptanceReport(**kwargs)
    assert info.value.key == key


def test_the_exit_code_is_not_the_config_error_code():
    assert FAILED_EXIT_CODE == 3


def test_a_continued_or_replaced_run_drops_the_old_verdict(tmp_path):
    write_rows(tmp_path, [{"iteration": 0, "train/loss": 1.0}])
    (tmp_path / ACCEPTANCE_FILE).write_text("{}")
    (tmp_path / (ACCEPTANCE_FILE + ".tmp")).write_text("{")  # a write cut short
    with RunDirectory(tmp_path) as directory:
        assert ACCEPTANCE_FILE in directory.claim("auto", overwrite=False)
    assert not (tmp_path / ACCEPTANCE_FILE).exists() and not (tmp_path / (ACCEPTANCE_FILE + ".tmp")).exists()
    (tmp_path / ACCEPTANCE_FILE).write_text("{}")
    with RunDirectory(tmp_path) as directory:
        assert ACCEPTANCE_FILE in directory.claim(None, overwrite=True)
    assert not (tmp_path / ACCEPTANCE_FILE).exists()
