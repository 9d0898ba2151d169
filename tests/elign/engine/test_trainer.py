"""The trainer is domain-free: it learns a categorical sequence policy, and resumes bitwise."""

import functools
import json

import pytest
import torch

from elign.engine.checkpoint import BEST, LATEST, load_checkpoint
from elign.engine.distributed import DistInfo
from elign.engine.errors import ConfigError
from elign.engine.schedule import ConstantSchedule
from elign.engine.strategies.fed_grpo import FedGRPOStrategy
from elign.engine.trainer import Trainer
from elign.engine.updates import fused_applies
from tests.elign.engine.toy import CategoricalPolicy, FusedCategoricalPolicy, TargetTokenReward, ToyPrompts

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_trainer(run_dir, max_iterations=20, resume=None, lr=0.1, kl_coef=0.0, policy_cls=None, **kw):
    torch.manual_seed(0)
    policy = (policy_cls or CategoricalPolicy)(num_steps=6, vocab=4)
    strategy = FedGRPOStrategy(channel_weights={"score": 1.0}, default_weight=1.0, advantage_mode="terminal",
                               pbrs_gamma=1.0, adv_clip=5.0, std_eps=1e-8, clip_range=0.2, kl_coef=kl_coef,
                               kl_estimator="k3")
    args = dict(policy=policy, strategy=strategy, reward=TargetTokenReward(), dataloader=ToyPrompts(32, 8),
                run_dir=run_dir, dist=SINGLE, optimizer=functools.partial(torch.optim.AdamW, lr=lr),
                lr_schedule=ConstantSchedule(0), max_iterations=max_iterations, micro_batch_size=8,
                step_chunk_size=4, grad_accum_steps=2, inner_epochs=1, max_grad_norm=1.0, save_interval=3,
                best_metric="reward/total", best_mode="max", resume=resume, seed=7, progress=False)
    args.update(kw)
    return Trainer(**args)


def rewards(run_dir):
    return [json.loads(line)["reward/total"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_toy_policy_reward_rises(tmp_path):
    trainer = make_trainer(tmp_path, max_iterations=20)
    trainer.fit()
    r = rewards(tmp_path)
    assert len(r) == 20
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert first < 0.4, f"uniform policy should start near 0.25, got {first}"
    assert last > first + 0.25, f"reward did not rise: {first:.3f} -> {last:.3f}"
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train/loss", "train/clip_frac", "train/grad_norm", "train/lr", "timing/rollout",
                "timing/reward", "timing/update", "reward/score", "reward/score_failed"):
        assert key in metrics, key
    assert (tmp_path / LATEST).is_file() and (tmp_path / BEST).is_file()


def test_kl_penalty_holds_policy_near_reference(tmp_path):
    free = make_trainer(tmp_path / "free", max_iterations=10, lr=0.2)
    free.fit()
    tied = make_trainer(tmp_path / "tied", max_iterations=10, lr=0.2, kl_coef=5.0)
    tied.fit()
    drift_free = free.policy.module.logits.detach().abs().sum()
    drift_tied = tied.policy.module.logits.detach().abs().sum()
    assert drift_tied < 0.7 * drift_free
    assert "train/kl" in json.loads((tmp_path / "tied" / "metrics.jsonl").read_text().splitlines()[-1])


def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", max_iterations=7)
    straight.fit()
    first = make_trainer(tmp_path / "b", max_iterations=7)
    first.max_iterations = 3  # stop early, as a crash after iteration 3 would (latest saved at 3)
    first.fit()
    resumed = make_trainer(tmp_path / "b", max_iterations=7, resume="auto")
    resumed.fit()
    for (name, p), q in zip(straight.policy.module.named_parameters(), resumed.policy.module.parameters()):
        assert torch.equal(p, q), name
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == list(range(7)), "each iteration logged once"


class CountingPolicy(CategoricalPolicy):
    """Reports each rollout's token count as a counter, as the LM policy reports TRL's num_tokens."""

    def rollout(self, prompts, group_size):
        rollout = super().rollout(prompts, group_size)
        rollout.info["counters"] = {"num_tokens": float(rollout.step_mask.sum())}
        return rollout


def test_counters_are_running_totals_that_survive_resume(tmp_path):
    first = make_trainer(tmp_path, max_iterations=3, policy_cls=CountingPolicy)
    first.fit()
    make_trainer(tmp_path, max_iterations=5, policy_cls=CountingPolicy, resume="auto").fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_rollout = 32 * 6  # ToyPrompts(32, 8): 32 samples of 6 steps
    assert [x["num_tokens"] for x in lines] == [per_rollout * (i + 1) for i in range(5)]


def test_checkpoint_loads_with_weights_only(tmp_path):
    make_trainer(tmp_path, max_iterations=2).fit()
    state = load_checkpoint(tmp_path / LATEST)
    assert state["iteration"] == 2 and "rng" in state and "scheduler" in state


def test_resume_from_missing_path_names_it(tmp_path):
    trainer = make_trainer(tmp_path, resume=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        trainer.fit()


def test_bad_trainer_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="best_mode"):
        make_trainer(tmp_path, best_mode="largest")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        make_trainer(tmp_path, micro_batch_size=0)


def test_null_grad_accum_takes_one_on_policy_step_per_rollout(tmp_path):
    trainer = make_trainer(tmp_path, max_iterations=3, grad_accum_steps=None)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_step"] for r in rows] == [1, 2, 3], "32 samples / micro-batch 8, all in one step"
    # The single step sees the rollout's own parameters, so every ratio is exactly 1 and none is clipped.
    assert all(r["train/clip_frac"] == 0.0 and r["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6) for r in rows)


class NoisySamplerPolicy(CategoricalPolicy):
    """Records log-probs with an error, as a sampler that rounds differently from training would
    (bfloat16 compute): the recorded values are off by ``noise`` nats per step."""

    noise = 0.5

    def rollout(self, prompts, group_size):
        out = super().rollout(prompts, group_size)
        g = torch.Generator().manual_seed(int(out.payload["tokens"].sum()))
        out.logp_old = out.logp_old + self.noise * torch.randn(out.logp_old.shape, generator=g)
        return out


def _noisy_rows(tmp_path, name, **kw):
    make_trainer(tmp_path / name, max_iterations=3, policy_cls=NoisySamplerPolicy, **kw).fit()
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_recomputed_old_logp_makes_on_policy_ratios_exact(tmp_path):
    recorded = _noisy_rows(tmp_path, "rollout", grad_accum_steps=None, old_logp="rollout")
    assert all(r["train/clip_frac"] > 0.1 for r in recorded), "noisy records push ratios out of the clip range"
    exact = _noisy_rows(tmp_path, "recompute", grad_accum_steps=None, old_logp="recompute")
    assert all(r["train/clip_frac"] == 0.0 and r["train/ratio_mean"] == 1.0 for r in exact)
    # The drift metric measures the sampler's error: E|N(0, 0.5^2)| = 0.5 * sqrt(2 / pi) ~ 0.40.
    assert all(0.3 < r["train/logp_drift"] < 0.5 for r in exact + recorded)


def test_recompute_pass_serves_several_optimizer_steps(tmp_path):
    # 32 samples, micro-batch 8, 2 micro-batches per step: 2 optimizer steps, so the old log-probs
    # come from a forward pass (no backward) before the first one.
    trainer = make_trainer(tmp_path, max_iterations=1, grad_accum_steps=2)
    rollout = trainer.policy.rollout(torch.zeros(4), 8)
    rollout.logp_old = rollout.logp_old + 1.0
    steps = torch.arange(6)
    micro, chunks = torch.arange(32).split(8), steps.split(4)
    sums = {"drift_sum": 0.0, "drift_count": 0.0}
    fresh = trainer.replay._recompute_logp(rollout, micro, chunks, sums)
    expected = trainer.policy.log_prob(rollout, steps, with_reference=False).logp
    torch.testing.assert_close(fresh.logp_old, expected.detach(), atol=0, rtol=0)
    assert sums["drift_sum"] / sums["drift_count"] == pytest.approx(1.0)
    assert torch.equal(fresh.payload["tokens"], rollout.payload["tokens"])
    assert not torch.equal(fresh.logp_old, rollout.logp_old), "the rollout itself is not modified"
    with pytest.raises(ConfigError, match="old_logp"):
        make_trainer(tmp_path, old_logp="sampler")


def test_fused_rollout_takes_the_replay_step(tmp_path):
    """Gradients taken while sampling, combined with the advantages, give the same optimizer steps
    as the replayed forward + backward (same seed, same rollouts)."""
    runs = {}
    for fused in (False, True):
        trainer = make_trainer(tmp_path / str(fused), max_iterations=4, grad_accum_steps=None,
                               policy_cls=FusedCategoricalPolicy, fused_rollout=fused)
        trainer.fit()
        rows = [json.loads(x) for x in (tmp_path / str(fused) / "metrics.jsonl").read_text().splitlines()]
        runs[fused] = (trainer.policy.module.logits.detach(), rows)
    (replayed, rows_r), (fused, rows_f) = runs[False], runs[True]
    assert replayed.abs().max() > 0.05, "the policy moved"
    torch.testing.assert_close(fused, replayed, rtol=1e-5, atol=1e-6)
    for a, b in zip(rows_r, rows_f):
        for key in ("reward/total", "train/loss", "train/grad_norm", "train/clip_frac", "train/ratio_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_fused_rollout_refuses_what_it_cannot_compute(tmp_path):
    with pytest.raises(ConfigError, match="fused_rollout.*rollout_with_grads"):
        make_trainer(tmp_path, grad_accum_steps=None, fused_rollout=True)  # the plain toy has none
    for kw, why in (({"grad_accum_steps": 2}, "one optimizer step per iteration"),
                    ({"grad_accum_steps": None, "inner_epochs": 2}, "one optimizer step per iteration"),
                    ({"grad_accum_steps": None, "kl_coef": 0.1}, "kl_coef: 0")):
        with pytest.raises(ConfigError, match=why):
            make_trainer(tmp_path, policy_cls=FusedCategoricalPolicy, fused_rollout=True, **kw)
    trainer = make_trainer(tmp_path, grad_accum_steps=None, policy_cls=FusedCategoricalPolicy)
    trainer.strategy.advantage_mode = "pbrs_return_to_go"
    with pytest.raises(ConfigError, match="advantage_mode: terminal"):
        fused_applies(True, trainer.policy, trainer.strategy, 1)
    assert fused_applies("auto", trainer.policy, trainer.strategy, 1)[0] is False
    rollout, grads = trainer.policy.rollout_with_grads(torch.zeros(4), 8)
    per_step = torch.linspace(-1, 1, 6).expand(32, 6)  # advantages that change along a trajectory
    with pytest.raises(ConfigError, match="fused_rollout.*per-step advantages"):
        trainer.fused_update(rollout, per_step, grads)
    with pytest.raises(ConfigError, match="fused_rollout.*true, false or auto"):
        make_trainer(tmp_path, fused_rollout="yes")


def test_fused_rollout_auto_uses_it_where_it_applies(tmp_path):
    on = make_trainer(tmp_path, grad_accum_steps=None, policy_cls=FusedCategoricalPolicy, fused_rollout="auto")
    assert on.fused is True
    for kw in ({"policy_cls": CategoricalPolicy}, {"grad_accum_steps": 2}, {"kl_coef": 0.1}):
        args = {"grad_accum_steps": None, "policy_cls": FusedCategoricalPolicy, "fused_rollout": "auto"} | kw
        assert make_trainer(tmp_path, **args).fused is False, kw


class _FixedRollout(CategoricalPolicy):
    """Replays one recorded rollout (or a subset of its samples) at every iteration."""

    recorded = None
    index = None

    def rollout(self, prompts, group_size):
        if _FixedRollout.recorded is None:
            _FixedRollout.recorded = super().rollout(torch.zeros(4), 8)
        ro = _FixedRollout.recorded
        return ro if self.index is None else ro.select(self.index)


class _DropGroup:
    """Filter that drops every sample of group 0 (keep = False)."""

    def __call__(self, rollout, reward):
        reward.keep = rollout.group_ids != 0
        return reward


def test_dropped_samples_leave_the_loss_and_the_statistics(tmp_path):
    """``keep`` = False is the same update as never having sampled those trajectories."""
    torch.manual_seed(11)
    _FixedRollout.recorded = None
    dropped = make_trainer(tmp_path / "dropped", max_iterations=1, grad_accum_steps=None, policy_cls=_FixedRollout,
                           filter=_DropGroup())
    dropped.fit()
    absent = make_trainer(tmp_path / "absent", max_iterations=1, grad_accum_steps=None, policy_cls=_FixedRollout,
                          dataloader=ToyPrompts(24, 8))
    absent.policy.index = torch.arange(8, 32)
    absent.fit()
    moved = dropped.policy.module.logits.detach()
    assert moved.abs().max() > 0, "the kept groups trained"
    torch.testing.assert_close(moved, absent.policy.module.logits.detach(), rtol=0, atol=1e-7)
    row = json.loads((tmp_path / "dropped" / "metrics.jsonl").read_text())
    ref = json.loads((tmp_path / "absent" / "metrics.jsonl").read_text())
    assert row["rollout/kept_frac"] == 0.75
    for key in ("reward/score", "reward/total", "train/loss", "train/grad_norm"):
        assert row[key] == pytest.approx(ref[key], rel=1e-6), key
