"""bfloat16 compute (model.dynamics.compute_dtype) through the real trainer: the sampler's recorded
log-probs differ from the training forward's by bf16 rounding, which a PPO clip range of 2e-3
cannot absorb; trainer.old_logp=recompute makes the on-policy ratios exact again."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import run as run_module
from elign.engine.distributed import DistInfo
from elign.engine.errors import ConfigError
from tests.elign.edm.test_learning import OVERRIDES
from tests.test_run import CONF

BF16 = OVERRIDES + ["model.dynamics.compute_dtype=bfloat16", "trainer.max_iterations=2",
                    "strategy.clip_range=2e-3", "trainer.grad_accum_steps=null", "trainer.micro_batch_size=8",
                    "trainer.step_chunk_size=5"]


def _fit(tmp_path, *extra: str) -> list[dict]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=BF16 + list(extra))
    torch.manual_seed(0)
    policy = run_module.build(cfg, "model")
    trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                               dataloader=run_module.build(cfg, "dataloader"), run_dir=str(tmp_path),
                               dist=DistInfo(0, 1, 0, torch.device("cpu")), reward=run_module.build(cfg, "reward"),
                               filter=run_module.build(cfg, "filter"))
    trainer.fit()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_bfloat16_on_policy_ratios_are_exact_with_recomputed_old_logp(tmp_path):
    exact = _fit(tmp_path / "recompute", "trainer.old_logp=recompute")
    assert all(r["train/clip_frac"] == 0.0 and r["train/ratio_mean"] == 1.0 for r in exact)
    assert all(r["train/logp_drift"] > 1e-4 for r in exact), "bf16 sampling should round differently"
    recorded = _fit(tmp_path / "rollout", "trainer.old_logp=rollout")
    assert max(r["train/clip_frac"] for r in recorded) > 0.0


def test_bfloat16_training_forward_is_reproducible_for_the_same_chunk():
    # What makes the no-grad recompute pass of multi-step layouts exact: same shapes, same bits.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=BF16)
    torch.manual_seed(0)
    policy = run_module.build(cfg, "model")
    rollout = policy.rollout(torch.tensor([7, 11]), 4).select(torch.arange(2, 6))
    cols = torch.arange(2, 7)
    first, second = (policy.log_prob(rollout, cols, with_kl=False)[0].detach() for _ in range(2))
    assert torch.equal(first, second)
    assert (first - rollout.logp_old[:, cols]).abs().max() > 0  # the sampler's record does differ
    assert first.dtype == torch.float32


@pytest.mark.parametrize("value", ["float16", "fp32"])
def test_bad_compute_dtype_is_a_config_error(value):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES + [f"model.dynamics.compute_dtype={value}"])
    with pytest.raises(ConfigError, match=r"model\.dynamics\.compute_dtype=.*allowed: float32, bfloat16"):
        run_module.build(cfg, "model")
