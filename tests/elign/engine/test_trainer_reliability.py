"""Trainer reliability: a resume with nothing to resume starts a clean metrics file, and a log file
gets plain progress lines instead of a redrawn bar."""

import json

import pytest

from tests.elign.engine.test_trainer import make_trainer

def test_resume_auto_before_the_first_checkpoint_logs_each_iteration_once(tmp_path):
    first = make_trainer(tmp_path, max_iterations=8)  # save_interval=3
    first.max_iterations = 2  # killed after iteration 2: metrics for 0 and 1, no checkpoint yet
    first.fit()
    (tmp_path / "checkpoint_latest.pth").unlink()  # fit() saves at its (shortened) last iteration
    resumed = make_trainer(tmp_path, max_iterations=4, resume="auto")
    resumed.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]


def test_progress_in_a_log_file_is_lines_not_carriage_returns(tmp_path, capsys):
    make_trainer(tmp_path, max_iterations=4, progress=True).fit()
    err = capsys.readouterr().err  # pytest's capture is not a terminal, like a batch job's log
    assert "\r" not in err
    assert [line.split()[1] for line in err.splitlines() if line.startswith("iterations ")] == \
        ["1/4", "2/4", "3/4", "4/4"]
