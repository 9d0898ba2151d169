"""atomic_save: all or nothing, a normal file mode, weights_only loading; stale temporaries; resume checks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elign.engine.checkpoint import (BEST, LATEST, CheckpointManager, atomic_save, check_resume, load_checkpoint,
                                     missing_best_warning, remove_stale_temporaries)
from elign.engine.errors import ConfigError


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"w": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"w": torch.zeros(2), "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2)), "the previous checkpoint survives"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(1)}, tmp_path / "ckpt.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pth").stat().st_mode & 0o777 == 0o644, "not mkstemp's private 0600"


CHILD_KILLED_MID_SAVE = """
import sys
import torch
from elign.engine.checkpoint import atomic_save

def stalled_save(obj, f):  # writes part of the file, then waits to be killed
    f.write(b"PK partial checkpoint")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()

torch.save = stalled_save
atomic_save({"w": 1}, sys.argv[1])
"""


def test_a_kill_inside_atomic_save_leaves_a_temporary_that_cleanup_removes(tmp_path):
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", CHILD_KILLED_MID_SAVE, str(tmp_path / LATEST)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{LATEST}.") and left[0].endswith(".tmp"), left
    # Files that are not atomic_save's temporaries of the run's checkpoints are never touched.
    keep = [f".{LATEST}.tmp", f".other.pth.abcdefgh.tmp", f".{LATEST}.abc.tmp", LATEST, "notes.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / f".{BEST}.a_b1c2d3.tmp").write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([left[0], f".{BEST}.a_b1c2d3.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@pytest.fixture
def trainer_checkpoint(tmp_path):
    state = {"iteration": 3, "optimizer_steps": 3, "model": {"w": torch.ones(2)}, "optimizer": {},
             "scheduler": {}, "rng": {}}
    atomic_save(state, tmp_path / LATEST)
    return tmp_path / LATEST


def test_check_resume_accepts_a_trainer_checkpoint(tmp_path, trainer_checkpoint):
    assert check_resume(tmp_path, None) is None
    assert check_resume(tmp_path, "auto") == trainer_checkpoint
    assert check_resume(tmp_path / "elsewhere", str(tmp_path)) == trainer_checkpoint  # a run directory
    assert check_resume(tmp_path / "fresh", "auto") is None  # nothing to resume yet


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "random", "weights_only"])
def test_check_resume_names_the_key_and_the_file(tmp_path, trainer_checkpoint, damage):
    path = tmp_path / "resume.pth"
    data = trainer_checkpoint.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "weights_only":
        atomic_save({"w": torch.ones(2)}, path)
    with pytest.raises(ConfigError) as info:
        check_resume(tmp_path, str(path))
    assert info.value.key == "trainer.resume"
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    if damage == "weights_only":
        assert "lacks iteration" in str(info.value)


def test_check_resume_auto_with_a_corrupt_latest_names_it(tmp_path, trainer_checkpoint):
    trainer_checkpoint.write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=rf"trainer.resume='auto'.*cannot load {trainer_checkpoint}"):
        check_resume(tmp_path, "auto")


def test_missing_best_warning(tmp_path):
    assert missing_best_warning(tmp_path, None) is None
    assert "'reward/total' was never logged" in missing_best_warning(tmp_path, "reward/total")
    atomic_save({"w": torch.ones(1)}, tmp_path / BEST)
    assert missing_best_warning(tmp_path, "reward/total") is None


def test_checkpoint_manager_rejects_bad_values():
    with pytest.raises(ConfigError, match="save_interval"):
        CheckpointManager(".", float("nan"), None, "max")
    with pytest.raises(ConfigError, match="best_mode"):
        CheckpointManager(".", 1, None, "largest")
