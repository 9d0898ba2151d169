"""Resume through the real EDM policy: stop after 2 iterations, resume, and end bitwise equal to
an uninterrupted 4-iteration run (CPU)."""

import torch
from hydra import compose, initialize_config_dir

import run as run_module
from elign.engine.distributed import DistInfo
from tests.test_run import CONF

OVERRIDES = ["model=edm/small", "model.dynamics.num_layers=2", "model.dynamics.hidden_nf=16", "model.num_steps=5",
             "reward=edm/compactness", "filter=none", "strategy.clip_range=0.2", "dataloader.batch_size=4",
             "dataloader.group_size=2", "trainer.micro_batch_size=2", "trainer.step_chunk_size=2",
             "trainer.progress=false", "trainer.optimizer.lr=1e-3", "trainer.save_interval=1"]


def train(run_dir, iterations, resume=None, stop_after=None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES + [f"trainer.max_iterations={iterations}",
                                                       f"trainer.resume={resume or 'null'}"])
    torch.manual_seed(cfg.seed)
    policy = run_module.build(cfg, "model")
    trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                               dataloader=run_module.build(cfg, "dataloader"), run_dir=str(run_dir),
                               dist=DistInfo(0, 1, 0, torch.device("cpu")), reward=run_module.build(cfg, "reward"),
                               filter=run_module.build(cfg, "filter"))
    if stop_after is not None:  # a crash: same config (LR schedule over all iterations), stops early
        trainer.max_iterations = stop_after
    trainer.fit()
    return policy


def test_edm_resume_bitwise(tmp_path):
    straight = train(tmp_path / "a", 4)
    train(tmp_path / "b", 4, stop_after=2)
    resumed = train(tmp_path / "b", 4, resume="auto")
    for (name, p), q in zip(straight.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name
    # the KL reference is the starting point, not the resumed weights
    for p, q in zip(straight.reference.parameters(), resumed.reference.parameters()):
        assert torch.equal(p, q)
