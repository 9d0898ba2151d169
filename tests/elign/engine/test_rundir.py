"""RunDirectory: one writer per directory (released when the process dies), and claim's rules for
fresh, resumed and overwritten runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elign.engine.checkpoint import BEST, LATEST
from elign.engine.errors import ConfigError, RunDirectoryError
from elign.engine.metrics import MetricsWriter, read_metrics
from elign.engine.rundir import LOCK_FILE, RunDirectory

ROOT = Path(__file__).resolve().parents[3]

HOLD_LOCK = """
import sys
from elign.engine.rundir import RunDirectory
run = RunDirectory(sys.argv[1])  # kept alive: the lock lives as long as its file object
run.lock()
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError) as info:
            RunDirectory(tmp_path).lock()
        assert str(tmp_path) in str(info.value) and f"pid {child.pid}" in str(info.value)
    finally:
        child.kill()  # a crash: no cleanup code runs, the kernel drops the lock
        child.wait(timeout=60)
    with RunDirectory(tmp_path) as run:
        assert run.locked
    assert (tmp_path / LOCK_FILE).is_file()  # the file stays; only the flock matters


def test_the_same_process_cannot_lock_twice_and_release_frees_it(tmp_path):
    first = RunDirectory(tmp_path / "new")  # created on lock
    first.lock()
    with pytest.raises(RunDirectoryError, match="another process"):
        RunDirectory(tmp_path / "new").lock()
    first.release()
    RunDirectory(tmp_path / "new").lock()


def _old_run(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("old: 1\n")
    writer = MetricsWriter(path)
    for i in range(3):
        writer.write({"iteration": i})
    return writer


def test_a_fresh_run_refuses_a_directory_that_holds_one(tmp_path):
    _old_run(tmp_path)
    with RunDirectory(tmp_path) as run, pytest.raises(RunDirectoryError) as info:
        run.claim(resume=None, overwrite=False)
    message = str(info.value)
    assert str(tmp_path) in message and "config.yaml, metrics.jsonl" in message
    assert "trainer.resume=auto" in message and "overwrite=true" in message
    assert len(read_metrics(tmp_path)) == 3, "nothing was touched"


def test_overwrite_deletes_the_old_run_files_only(tmp_path):
    _old_run(tmp_path)
    for name in (LATEST, BEST, "curves.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".hydra").mkdir()
    with RunDirectory(tmp_path) as run:
        removed = run.claim(resume=None, overwrite=True)
    assert sorted(removed) == sorted(["config.yaml", "metrics.jsonl", LATEST, BEST, "curves.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hydra", LOCK_FILE, "notes.txt"])


def test_resume_keeps_the_run_and_auto_without_a_checkpoint_starts_the_metrics_over(tmp_path):
    _old_run(tmp_path)
    (tmp_path / LATEST).write_text("x")
    with RunDirectory(tmp_path) as run:
        run.claim(resume="auto", overwrite=False)
        assert len(read_metrics(tmp_path)) == 3  # the trainer truncates from the checkpoint's iteration
        run.claim(resume=str(tmp_path / LATEST), overwrite=False)
        assert len(read_metrics(tmp_path)) == 3
        (tmp_path / LATEST).unlink()  # killed before its first checkpoint
        run.claim(resume="auto", overwrite=False)
        assert read_metrics(tmp_path) == [], "the restart at iteration 0 must not append to the old lines"
        with pytest.raises(ConfigError, match="overwrite"):
            run.claim(resume="auto", overwrite=True)


def test_resuming_another_directory_is_a_fresh_run_here(tmp_path):
    _old_run(tmp_path / "run")
    elsewhere = tmp_path / "other" / LATEST
    with RunDirectory(tmp_path / "run") as run:
        assert not run.continues(str(elsewhere)) and run.continues(str(tmp_path / "run"))
        with pytest.raises(RunDirectoryError, match="already holds a run"):
            run.claim(resume=str(elsewhere), overwrite=False)
        run.claim(resume=str(elsewhere), overwrite=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_claim_removes_stale_temporaries_on_every_start(tmp_path):
    stale = [f".{LATEST}.k2j4h5g6.tmp", "metrics.jsonl.tmp"]
    for name in stale:
        (tmp_path / name).write_text("x")
    with RunDirectory(tmp_path) as run:
        assert run.claim(resume=None, overwrite=False) == stale[:1]
    assert not any((tmp_path / name).exists() for name in stale)
    with pytest.raises(RuntimeError, match="lock"):
        RunDirectory(tmp_path).claim(None, False)
