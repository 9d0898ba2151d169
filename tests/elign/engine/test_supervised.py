"""Supervised training through the same trainer (domain-free): the loss falls, the EMA tracks the
weights, and a resumed run (data position included) is bitwise equal to an uninterrupted one."""

import functools
import json

import pytest
import torch

from elign.data.loader import MoleculeBatches
from elign.engine.checkpoint import load_checkpoint
from elign.engine.schedule import WarmupCosineSchedule
from elign.engine.strategies.supervised import SupervisedStrategy
from elign.engine.trainer import Trainer
from tests.elign.engine.test_trainer import SINGLE
from tests.elign.engine.toy import CategoricalPolicy

# data: sequences of 6 tokens, mostly token 2
DATA = [torch.where(torch.rand(6, generator=torch.Generator().manual_seed(i)) < 0.8, 2, 1) for i in range(40)]


def make(run_dir, iterations, resume=None, evaluator=None, batch_size=8, grad_accum_steps=1, dist=SINGLE):
    torch.manual_seed(0)
    policy = CategoricalPolicy(num_steps=6, vocab=4)
    data = MoleculeBatches(DATA, batch_size=batch_size, seed=3, collate=torch.stack)
    return Trainer(policy=policy, strategy=SupervisedStrategy(), reward=None, dataloader=data,
                   run_dir=run_dir, dist=dist, optimizer=functools.partial(torch.optim.AdamW, lr=0.2),
                   lr_schedule=WarmupCosineSchedule(2, None, 0.1), max_iterations=iterations, micro_batch_size=8,
                   step_chunk_size=None, grad_accum_steps=grad_accum_steps, inner_epochs=1, max_grad_norm=1.0, save_interval=2,
                   best_metric="eval/p_target" if evaluator else None, best_mode="max", resume=resume, seed=0,
                   progress=False, ema_decay=0.9, eval_interval=3 if evaluator else 0, evaluator=evaluator)


def p_target(policy):
    return {"p_target": float(torch.softmax(policy.module.logits.detach(), -1)[:, 2].mean())}


def test_supervised_loss_falls_with_ema_and_eval(tmp_path):
    trainer = make(tmp_path, 12, evaluator=p_target)
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["iteration"] for r in train] == list(range(12))
    assert train[-1]["train/loss"] < 0.6 * train[0]["train/loss"]
    evals = [r for r in rows if "eval/p_target" in r]
    assert [r["iteration"] for r in evals] == [-1, 2, 5, 8, 11]  # -1: the starting weights, before any update
    assert evals[-1]["eval/p_target"] > evals[1]["eval/p_target"] > evals[0]["eval/p_target"]
    # the evaluation saw the EMA weights, which lag behind the raw ones
    raw = p_target(trainer.policy)["p_target"]
    assert evals[-1]["eval/p_target"] < raw
    state = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert "ema" in state and state["best_value"] == max(r["eval/p_target"] for r in evals[1:])


def test_initial_evaluation_is_logged_once_and_not_repeated_on_resume(tmp_path):
    torch.manual_seed(0)
    start = p_target(CategoricalPolicy(num_steps=6, vocab=4))["p_target"]  # make() builds this policy
    make(tmp_path, 2, evaluator=p_target).fit()  # a run stopped after 2 of 6 iterations (checkpoint at 2)
    resumed = make(tmp_path, 6, resume="auto", evaluator=p_target)
    resumed.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [-1, 0, 1, 2, 3, 4, 5]
    assert rows[0]["optimizer_step"] == 0 and set(k for k in rows[0] if k.startswith("train/")) == set()
    assert rows[0]["eval/p_target"] == start
    off = make(tmp_path / "off", 3, evaluator=p_target)
    off.eval_at_start = False
    off.fit()
    rows = [json.loads(x) for x in (tmp_path / "off/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]


def test_supervised_resume_is_bitwise_including_data_position(tmp_path):
    straight = make(tmp_path / "a", 9)
    straight.fit()
    crashed = make(tmp_path / "b", 9)
    crashed.max_iterations = 4  # latest saved at 4 (save_interval 2)
    crashed.fit()
    resumed = make(tmp_path / "b", 9, resume="auto")
    resumed.fit()
    assert torch.equal(straight.policy.module.logits, resumed.policy.module.logits)
    assert torch.equal(straight.ema.shadow["logits"], resumed.ema.shadow["logits"])
    assert straight.prompts.state_dict() == resumed.prompts.state_dict()


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Two accumulated batches of 4 take the step of one batch of 8 (the same 8 samples, in order)."""
    runs = {}
    for batch_size, accum in ((8, 1), (4, 2)):
        trainer = make(tmp_path / str(accum), 5, batch_size=batch_size, grad_accum_steps=accum)
        trainer.fit()
        rows = [json.loads(x) for x in (tmp_path / str(accum) / "metrics.jsonl").read_text().splitlines()]
        runs[accum] = (trainer.policy.module.logits.detach(), rows, trainer.prompts.state_dict())
    (big, rows_big, state_big), (small, rows_small, state_small) = runs[1], runs[2]
    assert big.abs().max() > 0.1, "the policy moved"
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-6)
    assert state_small["position"] == state_big["position"] and state_small["epoch"] == state_big["epoch"]
    for a, b in zip(rows_big, rows_small):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/nll"] == pytest.approx(a["train/nll"], rel=1e-5)
        assert b["train/samples_per_s"] > 0 and b["train/tokens_per_s"] == pytest.approx(6 * b["train/samples_per_s"])


def test_accumulated_batches_are_weighted_by_the_policys_count():
    """A policy that reports what its loss averages over gets the global mean (3 and 1 items: 3/4, 1/4);
    without that hook every batch weighs 1 / grad_accum_steps."""
    from types import SimpleNamespace

    from elign.engine.updates import SupervisedUpdate

    counted = SimpleNamespace(supervised_weight=lambda batch: batch["n"])
    update = SupervisedUpdate(counted, None, None, None, grad_accum_steps=2, dist=SINGLE)
    assert update.weights([{"n": 3}, {"n": 1}]) == [0.75, 0.25]
    assert update.weights([{"n": 0}, {"n": 0}]) == [0.0, 0.0]  # nothing to average over: no gradient
    plain = SupervisedUpdate(SimpleNamespace(), None, None, None, grad_accum_steps=2, dist=SINGLE)
    assert plain.weights([{"n": 3}, {"n": 1}]) == [0.5, 0.5]
