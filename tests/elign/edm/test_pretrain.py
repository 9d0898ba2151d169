"""EDM pretraining through the same trainer on the shipped QM9 sample (noise-prediction loss,
EMA, periodic sampling evaluation, best checkpoint on the evaluation)."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import run as run_module
from elign.data.sample import NPZ_NAME, _sample_dir
from elign.engine.distributed import DistInfo
from tests.test_run import CONF

pytestmark = pytest.mark.skipif(not (_sample_dir(None) / NPZ_NAME).is_file(), reason="QM9 sample not built")


def test_pretraining_loss_falls_and_eval_selects_best(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=edm/pretrain", "model.dynamics.num_layers=2", "model.dynamics.hidden_nf=32",
            "model.num_steps=10", "dataloader.batch_size=16", "trainer.max_iterations=40",
            "trainer.eval_interval=20", "trainer.lr_schedule.warmup_steps=5", "trainer.progress=false",
            "evaluator.num_samples=8", "evaluator.batch_size=8", "evaluator.force_field=null"])
    torch.manual_seed(0)
    policy = run_module.build(cfg, "model")
    trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                               dataloader=run_module.build(cfg, "dataloader"), run_dir=str(tmp_path),
                               dist=DistInfo(0, 1, 0, torch.device("cpu")), reward=run_module.build(cfg, "reward"),
                               filter=run_module.build(cfg, "filter"), evaluator=run_module.build(cfg, "evaluator"))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    first = sum(r["train/loss"] for r in rows[:5]) / 5
    last = sum(r["train/loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, f"noise-prediction loss did not fall: {first:.3f} -> {last:.3f}"
    evals = [r for r in rows if "eval/molecule_stability" in r]
    assert [r["iteration"] for r in evals] == [19, 39]
    assert (tmp_path / "checkpoint_best.pth").is_file()
    # the best checkpoint loads back as starting weights (its EMA)
    cfg.model.checkpoint = str(tmp_path / "checkpoint_best.pth")
    reloaded = run_module.build(cfg, "model")
    state = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    assert torch.equal(reloaded.module.egnn.embedding.weight, state["ema"]["egnn.embedding.weight"])
