"""sample / evaluate / report on a real (tiny) run directory."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from elign.edm.cli import main
from tests.elign.edm.test_resume import OVERRIDES, train


def test_sample_evaluate_report(tmp_path):
    run = tmp_path / "run"
    train(run, 2)
    from hydra import compose, initialize_config_dir

    from tests.test_run import CONF
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        OmegaConf.save(compose("config", overrides=OVERRIDES), run / "config.yaml")
    samples = tmp_path / "s.pt"
    main(["sample", "--run-dir", str(run), "--num", "6", "--batch-size", "4", "--seed", "3", "--out", str(samples)])
    data = torch.load(samples, weights_only=True)
    assert data["positions"].shape == (6, 29, 3) and data["node_mask"].sum() > 0
    again = tmp_path / "s2.pt"
    main(["sample", "--run-dir", str(run), "--num", "6", "--batch-size", "4", "--seed", "3", "--out", str(again)])
    assert torch.equal(data["positions"], torch.load(again, weights_only=True)["positions"]), "seeded"
    out = tmp_path / "eval.json"
    main(["evaluate", "--samples", str(samples), "--force-field", "mmff", "--workers", "0", "--out", str(out)])
    metrics = json.loads(out.read_text())
    for key in ("molecule_stability", "atom_stability", "validity", "uniqueness", "ff_failed_frac", "connected",
                "fragments_per_molecule"):
        assert key in metrics
    main(["report", str(run), "--samples", str(samples)])
    assert (run / "curves.png").stat().st_size > 10_000 and (run / "molecules.png").stat().st_size > 5_000


def test_export_keeps_the_ema_weights_only(tmp_path):
    from elign.engine.checkpoint import atomic_save

    model = {"w": torch.zeros(3, 2)}
    ema = {"w": torch.arange(6.0).view(3, 2)}
    atomic_save({"model": model, "ema": ema, "optimizer": {"state": {}}, "iteration": 7}, tmp_path / "ckpt.pth")
    main(["export", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "w.pth")])
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    assert list(state) == ["w"] and torch.equal(state["w"], ema["w"])


def test_sample_from_a_model_config_uses_the_weights_it_names(tmp_path):
    from tests.test_run import CONF

    out = tmp_path / "s.pt"
    main(["sample", "--model-config", str(CONF / "model" / "edm" / "base.yaml"), "--num", "2",
          "--out", str(out)])
    assert torch.load(out, weights_only=True)["checkpoint"] == "package:elign/edm/weights/edm_base.pth"
    bare = OmegaConf.load(CONF / "model" / "edm" / "base.yaml")
    bare.checkpoint = None
    OmegaConf.save(bare, tmp_path / "bare.yaml")
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["sample", "--model-config", str(tmp_path / "bare.yaml"), "--num", "2", "--out", str(out)])


def _bad_samples(tmp_path, damage):
    path = tmp_path / "samples.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "keys":
        torch.save({"positions": torch.zeros(2, 3, 3), "atomic_numbers": torch.ones(2, 3, dtype=torch.long)}, path)
    elif damage == "shapes":
        torch.save({"positions": torch.zeros(2, 3, 3), "atomic_numbers": torch.ones(2, 4, dtype=torch.long),
                    "node_mask": torch.ones(2, 3, dtype=torch.bool)}, path)
    elif damage == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("damage,reason", [("missing", "no such samples file"), ("empty", "not a readable samples file"),
                                           ("random", "not a readable samples file"),
                                           ("keys", "not a samples file: needs tensors positions, atomic_numbers, node_mask"),
                                           ("shapes", "inconsistent shapes"), ("directory", "no such samples file")])
def test_evaluate_bad_samples_file_exits_2_naming_it(tmp_path, capsys, damage, reason):
    path = _bad_samples(tmp_path, damage)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--samples", str(path), "--force-field", "none"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: {reason}"), err


def test_unreadable_inputs_of_the_other_commands_exit_2_naming_them(tmp_path, capsys):
    corrupt = tmp_path / "ckpt.pth"
    corrupt.write_bytes(b"\x00garbage")
    for argv, named in [(["export", "--checkpoint", str(corrupt), "--out", str(tmp_path / "w.pth")], corrupt),
                        (["sample", "--run-dir", str(tmp_path), "--out", str(tmp_path / "s.pt")],
                         tmp_path / "config.yaml"),
                        (["report", str(tmp_path)], tmp_path / "metrics.jsonl")]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and str(named) in err, (argv, err)


def test_the_module_entry_point_exits_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-m", "elign.edm.cli", "evaluate", "--samples", str(tmp_path / "none.pt")],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'none.pt'}: no such samples file (written by `sample`)"
