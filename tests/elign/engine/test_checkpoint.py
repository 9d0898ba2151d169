"""atomic_save: all or nothing, a normal file mode, and weights_only loading."""

import os

import pytest
import torch

from elign.engine.checkpoint import atomic_save, load_checkpoint


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
