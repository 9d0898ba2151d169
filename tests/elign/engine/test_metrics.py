import json

import pytest

from elign.engine.errors import DataFormatError
from elign.engine.metrics import MetricsWriter, WandbLogger, read_metrics
from tests.elign.engine.test_trainer import make_trainer


def test_metrics_writer_truncates_on_resume(tmp_path):
    w = MetricsWriter(tmp_path)
    for i in range(5):
        w.write({"iteration": i, "x": float("nan") if i == 4 else 1.0})
    assert read_metrics(tmp_path)[-1]["x"] is None  # NaN written as JSON null, not invalid JSON
    w.truncate_from(3)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_read_metrics_names_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_wandb_offline_keeps_run_id_across_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = make_trainer(tmp_path, max_iterations=2, logger=WandbLogger("test", None, "offline"))
    first.fit()
    run_id = first.logger.run_id
    assert run_id
    resumed = make_trainer(tmp_path, max_iterations=4, resume="auto", logger=WandbLogger("test", None, "offline"))
    resumed.fit()
    assert resumed.logger.run_id == run_id
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "offline run files missing"
    assert len(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])) > 5


def _three_lines_and(tail: str, tmp_path):
    w = MetricsWriter(tmp_path)
    for i in range(3):
        w.write({"iteration": i, "x": 1.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(tail)
    return w


def test_resume_drops_a_torn_last_line_with_a_warning_naming_the_file(tmp_path):
    w = _three_lines_and('{"iteration": 3, "x": 1.', tmp_path)  # killed mid-write: no closing brace, no newline
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:4: dropping a torn last line"):
        w.truncate_from(2)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]
    w.write({"iteration": 2, "x": 2.0})  # the next line starts on a line of its own
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_a_malformed_line_before_the_last_is_a_data_format_error(tmp_path):
    w = _three_lines_and('garbage\n{"iteration": 3}\n', tmp_path)
    with pytest.raises(DataFormatError, match=r"metrics\.jsonl:4: not a JSON object line"):
        w.truncate_from(2)
    with pytest.raises(DataFormatError, match=r"metrics\.jsonl:4"):
        read_metrics(tmp_path)


def test_reset_drops_every_line(tmp_path):
    w = _three_lines_and("", tmp_path)
    w.reset()
    w.write({"iteration": 0, "x": 3.0})
    assert read_metrics(tmp_path) == [{"iteration": 0, "x": 3.0}]
    MetricsWriter(tmp_path / "absent").reset()  # nothing to drop is fine
    MetricsWriter(tmp_path, enabled=False).reset()  # a non-main rank touches nothing
    assert len(read_metrics(tmp_path)) == 1
