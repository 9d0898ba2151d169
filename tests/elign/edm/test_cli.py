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
