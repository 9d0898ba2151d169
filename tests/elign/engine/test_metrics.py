import json

import pytest

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
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\nnot json\n')
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
