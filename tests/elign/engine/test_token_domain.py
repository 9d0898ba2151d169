"""The engine serves a variable-length token domain (tests/elign/engine/toy_tokens.py) with TRL's GRPO:
it learns under every loss type and importance-sampling level, micro-batches and step chunks add up
to the whole batch exactly, and the padding after EOS never reaches the update."""

import copy
import functools
import json

import pytest
import torch

from elign.engine.distributed import DistInfo
from elign.engine.errors import ConfigError
from elign.engine.schedule import ConstantSchedule
from elign.engine.strategies.base import ScoredRewards
from elign.engine.strategies.grpo import GRPOStrategy
from elign.engine.trainer import Trainer
from tests.elign.engine.toy_tokens import EOS, PAD, TargetTextReward, TokenPolicy, TokenPrompts, completion_lengths

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 8


def make_trainer(run_dir, policy, strategy, *, optimizer=None, batch_size=32, group_size=8, **kw):
    args = dict(policy=policy, strategy=strategy, reward=TargetTextReward(MAX_LEN),
                dataloader=TokenPrompts(batch_size, group_size, num_prompts=4), run_dir=run_dir, dist=SINGLE,
                optimizer=optimizer or functools.partial(torch.optim.Adam, lr=0.02), lr_schedule=ConstantSchedule(0),
                max_iterations=12, micro_batch_size=8, step_chunk_size=None, grad_accum_steps=2, inner_epochs=1,
                max_grad_norm=1.0, save_interval=100, best_metric=None, best_mode="max", resume=None, seed=0,
                progress=False)
    return Trainer(**(args | kw))


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rollout_has_variable_lengths_padding_and_exact_log_probs():
    torch.manual_seed(0)
    policy = TokenPolicy(max_len=MAX_LEN, temperature=0.7)
    rollout = policy.rollout(torch.arange(4), group_size=8)
    tokens, mask = rollout.payload["tokens"], rollout.step_mask
    lengths = completion_lengths(tokens)
    assert lengths.unique().numel() >= 3, "completions of different lengths"
    ended = (tokens == EOS).any(dim=1)
    assert ended.any() and (~ended).any(), "some completions stop at EOS, some at the length limit"
    eos_at = torch.where(ended, (tokens == EOS).float().argmax(dim=1), MAX_LEN - 1)
    after_eos = torch.arange(MAX_LEN)[None, :] > eos_at[:, None]
    assert torch.equal(mask, ~after_eos), "trained up to and including EOS, nothing after"
    assert (tokens[after_eos] == PAD).all() and (rollout.logp_old[after_eos] == 0).all()
    score = TargetTextReward(MAX_LEN)(rollout).channels["score"].view(4, 8)
    assert (score.std(dim=1) > 0).all(), "every group has reward spread (a GRPO signal)"
    # The teacher-forced log-probs (at the sampling temperature) are the sampler's.
    steps = torch.arange(MAX_LEN)
    out = policy.log_prob(rollout, steps, with_reference=True)
    torch.testing.assert_close(out.logp.detach(), rollout.logp_old, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.ref_logp, rollout.logp_old, atol=1e-5, rtol=0)
    # A chunk of steps gives the same columns as the whole sequence.
    torch.testing.assert_close(policy.log_prob(rollout, steps[2:5], False).logp, out.logp[:, 2:5], atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reward_rises_under_every_loss_type(tmp_path, loss_type, level):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN), GRPOStrategy(loss_type=loss_type,
                                                                                importance_sampling=level))
    trainer.fit()
    r = [row["reward/total"] for row in metric_rows(tmp_path)]
    first, last = sum(r[:2]) / 2, sum(r[-3:]) / 3
    # Random policy: short completions, a third of them the target (~0.5); best 1.5 (8 target tokens).
    # Seeds 0, 1, 2 rise by about 1.0 in every case.
    assert first < 0.9, f"a random policy should score ~0.5, got {first:.3f}"
    assert last > first + 0.4, f"reward did not rise: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_k3_kl_to_the_frozen_reference_trains_and_restrains(tmp_path, level):
    finals = {}
    for beta in (0.02, 1.0):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / str(beta), TokenPolicy(max_len=MAX_LEN),
                               GRPOStrategy(loss_type="dapo", importance_sampling=level, beta=beta, kl_estimator="k3"))
        trainer.fit()
        rows = metric_rows(tmp_path / str(beta))
        assert all("train/kl" in row for row in rows)
        finals[beta] = rows
    r = [row["reward/total"] for row in finals[0.02]]
    assert sum(r[-3:]) / 3 > sum(r[:2]) / 2 + 0.4, "a light KL still lets the reward rise"
    kl_light, kl_heavy = (sum(row["train/kl"] for row in finals[b][-3:]) / 3 for b in (0.02, 1.0))
    assert kl_light > 0.05, "the trained policy has left the reference"
    assert kl_heavy < 0.5 * kl_light, f"beta=1 should hold the policy nearer: {kl_heavy:.4f} vs {kl_light:.4f}"


def fixed_batch(seed=0, noise=0.3, padding_logp=0.0):
    """A float64 policy moved away from its reference, a rollout of 3 prompts x 4, recorded
    log-probs off by ``noise`` on the trained steps (so ratios are clipped) and its advantages."""
    torch.manual_seed(seed)
    policy = TokenPolicy(max_len=MAX_LEN, dtype=torch.float64, padding_logp=padding_logp)
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rollout = policy.rollout(torch.arange(3), group_size=4)
    rollout.logp_old = rollout.logp_old + noise * torch.randn_like(rollout.logp_old) * rollout.step_mask
    score = TargetTextReward(MAX_LEN)(rollout).channels["score"].double()
    scored = ScoredRewards(channels={"score": score}, keep=torch.ones(12, dtype=torch.bool))
    return policy, rollout, scored


def one_step(tmp_path, policy, rollout, scored, strategy, micro_batch_size, step_chunk_size):
    """One SGD step (lr 1: the parameters move by minus the gradient) with the recorded log-probs."""
    trainer = make_trainer(tmp_path, copy.deepcopy(policy), strategy,
                           optimizer=functools.partial(torch.optim.SGD, lr=1.0), batch_size=12, group_size=4, micro_batch_size=micro_batch_size,
                           step_chunk_size=step_chunk_size, grad_accum_steps=None, max_grad_norm=None,
                           old_logp="rollout")
    advantages, _ = strategy.advantages(scored, rollout)
    metrics = trainer.replay(rollout, advantages)
    assert trainer.optimizer_steps == 1
    return {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters()}, metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_and_chunks_add_up_to_the_whole_batch(tmp_path, loss_type, level):
    policy, rollout, scored = fixed_batch()
    assert rollout.step_mask.sum(dim=1).unique().numel() > 2, "sequences of different lengths"
    strategy = GRPOStrategy(loss_type=loss_type, importance_sampling=level, beta=0.1, epsilon_high=0.28)
    whole, m_whole = one_step(tmp_path / "whole", policy, rollout, scored, strategy, 12, None)
    # 12 samples in micro-batches of 5, 5, 2 (cutting groups); token level also in chunks of 3 steps.
    split, m_split = one_step(tmp_path / "split", policy, rollout, scored, strategy, 5, 3 if level == "token" else None)
    assert m_whole["train/clip_frac"] > 0, "the step exercises the clip"
    moved = max(float((whole[n] - p.detach()).abs().max()) for n, p in policy.module.named_parameters())
    assert moved > 1e-3, "the step moved the policy"
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-10, atol=1e-12, msg=name)
    for key in ("train/loss", "train/kl", "train/clip_frac", "train/ratio_mean"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-10, abs=1e-12), key


def test_sequence_importance_sampling_refuses_step_chunks(tmp_path):
    gspo = GRPOStrategy(importance_sampling="sequence")
    with pytest.raises(ConfigError, match="step_chunk_size"):
        make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN), gspo, step_chunk_size=3)
    make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN), gspo, step_chunk_size=None)
    make_trainer(tmp_path, TokenPolicy(max_len=MAX_LEN), GRPOStrategy(importance_sampling="token"), step_chunk_size=3)


@pytest.mark.parametrize("perturbation", [5.0, float("nan")], ids=["shifted", "nan"])
@pytest.mark.parametrize("level,loss_type,chunk", [("token", "grpo", 3), ("sequence", "grpo", None),
                                                   ("sequence", "dr_grpo", None), ("token", "dapo", None)])
def test_steps_after_eos_never_enter_the_update(tmp_path, level, loss_type, chunk, perturbation):
    policy, rollout, scored = fixed_batch(seed=1)
    padding = ~rollout.step_mask
    assert padding.any()
    strategy = GRPOStrategy(loss_type=loss_type, importance_sampling=level, beta=0.1)
    clean, m_clean = one_step(tmp_path / "clean", policy, rollout, scored, strategy, 4, chunk)
    rollout.logp_old = torch.where(padding, rollout.logp_old + perturbation, rollout.logp_old)
    dirty, m_dirty = one_step(tmp_path / "dirty", policy, rollout, scored, strategy, 4, chunk)
    for name in clean:
        assert torch.equal(dirty[name], clean[name]), name
    for key in ("train/loss", "train/kl", "train/clip_frac", "train/ratio_mean"):
        assert m_dirty[key] == m_clean[key], key


def minus_infinity_padding_steps(tmp_path, strategy):
    """Parameters and metrics after one step with log-prob 0 and with -inf after EOS."""
    out = {}
    for padding in (0.0, float("-inf")):
        policy, rollout, scored = fixed_batch(seed=2, padding_logp=padding)
        assert (rollout.logp_old[~rollout.step_mask] == padding).all()
        out[padding] = one_step(tmp_path / str(padding), policy, rollout, scored, strategy, 12, None)
    return out[0.0], out[float("-inf")]


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_minus_infinity_on_padding_gives_the_same_update(tmp_path, level, beta):
    """A policy may report log-prob -inf after EOS: the importance weights, the k3 KL and the loss
    sums select the trained pairs before -inf - (-inf) = NaN can reach a value or a gradient."""
    (zero, m_zero), (inf, m_inf) = minus_infinity_padding_steps(
        tmp_path, GRPOStrategy(loss_type="grpo", importance_sampling=level, beta=beta))
    for name, value in zero.items():
        assert torch.equal(inf[name], value), name
    for key in ("train/loss", "train/clip_frac", "train/ratio_mean") + (("train/kl",) if beta else ()):
        assert m_inf[key] == m_zero[key], key


def test_minus_infinity_on_padding_keeps_the_drift_metric_finite(tmp_path):
    (_, m_zero), (_, m_inf) = minus_infinity_padding_steps(tmp_path, GRPOStrategy(loss_type="grpo"))
    assert m_inf["train/logp_drift"] == m_zero["train/logp_drift"]
