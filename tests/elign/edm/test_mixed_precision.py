"""bfloat16 compute (model.dynamics.compute_dtype) through the real trainer: the sampler's recorded
log-probs differ from the training forward's by bf16 rounding, which a PPO clip range of 2e-3
cannot absorb; trainer.old_logp=recompute makes the on-policy ratios exact again."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import run as run_module
from elign.edm.egnn import EGNNDynamics
from elign.edm.policy import EDMPolicy
from elign.edm.schedule import PolynomialSchedule
from elign.engine.distributed import DistInfo
from elign.engine.errors import ConfigError
from tests.elign.edm.test_learning import OVERRIDES
from tests.test_run import CONF

BF16 = OVERRIDES + ["model.dynamics.compute_dtype=bfloat16", "trainer.max_iterations=2",
                    "strategy.clip_range=2e-3", "trainer.grad_accum_steps=null", "trainer.micro_batch_size=8",
                    "trainer.step_chunk_size=5", "trainer.fused_rollout=false"]  # these tests are about the replay


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
    # What makes the recompute pass of multi-step layouts exact: same shapes, same bits.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=BF16)
    torch.manual_seed(0)
    policy = run_module.build(cfg, "model")
    rollout = policy.rollout(torch.tensor([7, 11]), 4).select(torch.arange(2, 6))
    cols = torch.arange(2, 7)
    first, second = (policy.log_prob(rollout, cols, with_reference=False).logp.detach() for _ in range(2))
    assert torch.equal(first, second)
    assert (first - rollout.logp_old[:, cols]).abs().max() > 0  # the sampler's record does differ
    assert first.dtype == torch.float32


@pytest.mark.parametrize("value", ["float16", "fp32"])
def test_bad_compute_dtype_is_a_config_error(value):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES + [f"model.dynamics.compute_dtype={value}"])
    with pytest.raises(ConfigError, match=r"model\.dynamics\.compute_dtype=.*allowed: float32, bfloat16"):
        run_module.build(cfg, "model")


def _policy(compute_dtype: str, full_precision_steps: int, num_steps: int = 10) -> EDMPolicy:
    torch.manual_seed(0)
    dyn = EGNNDynamics(hidden_nf=32, num_layers=2, compute_dtype=compute_dtype)
    return EDMPolicy(dyn, PolynomialSchedule(), num_steps=num_steps, full_precision_steps=full_precision_steps)


def test_full_precision_steps_run_exactly_as_float32():
    # k = T: every step ignores bfloat16, so sampling and log-probs are bitwise those of float32.
    full, bf16_all = _policy("float32", 0), _policy("bfloat16", 10)
    rollouts = []
    for policy in (full, bf16_all):
        torch.manual_seed(5)
        rollouts.append(policy.rollout(torch.tensor([6, 9]), 2))
    assert torch.equal(rollouts[0].payload["latents"], rollouts[1].payload["latents"])
    cols = torch.arange(10)
    assert torch.equal(full.log_prob(rollouts[0], cols, False).logp, bf16_all.log_prob(rollouts[0], cols, False).logp)


def test_only_the_last_steps_run_in_full_precision():
    full, mixed = _policy("float32", 0), _policy("bfloat16", 2)
    torch.manual_seed(5)
    rollout = full.rollout(torch.tensor([6, 9]), 2)
    cols = torch.arange(6, 10)  # one call spanning both precisions: split per molecule inside the module
    a, b = full.log_prob(rollout, cols, False).logp.detach(), mixed.log_prob(rollout, cols, False).logp
    assert torch.equal(a[:, 2:], b[:, 2:].detach()), "the last two columns are float32"
    assert not torch.equal(a[:, :2], b[:, :2].detach()), "the earlier ones are bfloat16"
    b.sum().backward()  # the split forward is differentiable
    assert all(p.grad is not None for p in mixed.module.parameters())


def test_full_precision_steps_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="full_precision_steps"):
        _policy("bfloat16", 11)
