"""GRPO of the Qwen3 policy under data parallelism: two gloo ranks, each holding half of one rollout
(whole groups), take exactly the optimizer steps one process takes on the whole rollout, and log its
loss. The dapo loss divides by the tokens of the whole generation batch (an all-reduce), so ranks whose
completions hold unequal numbers of tokens still average as one token mean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from elign.engine.distributed import DistInfo  # noqa: E402
from elign.engine.rollout import RewardOutput, Rollout  # noqa: E402
from elign.engine.schedule import ConstantSchedule  # noqa: E402
from elign.engine.strategies.grpo import GRPOStrategy  # noqa: E402
from elign.engine.trainer import Trainer  # noqa: E402
from molgen_grpo.policy import Prompt, Qwen3Policy  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402
from tests.elign.engine.ddp_harness import run_ranks  # noqa: E402

TINY = dict(init="random", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=1024)
PROMPTS = [Prompt(i, f"[SMILES]{s}[/SMILES]") for i, s in enumerate(["CCO", "CCN", "C#N", "CC=O"])]
GROUP, ITERATIONS = 2, 2


def _policy() -> Qwen3Policy:
    torch.manual_seed(0)
    return Qwen3Policy(load_tokenizer(ASSET_PATH), TINY, stop_tokens=["[/CONFORMER]", "<|endoftext|>", "C"],
                       max_new_tokens=10)


class HalfRollouts(Qwen3Policy):
    """The policy whose rollout is this rank's half of a rollout sampled with a rank-independent seed."""

    def rollout(self, prompts, group_size) -> Rollout:
        with torch.random.fork_rng():
            torch.manual_seed(1000 + self.calls)
            full = Qwen3Policy.rollout(self, PROMPTS, group_size)
        self.calls += 1
        if self.world_size == 1:
            return full
        half = full.batch_size // self.world_size
        return full.select(torch.arange(self.rank * half, (self.rank + 1) * half))


def length_reward(rollout: Rollout) -> RewardOutput:
    """Completion length: varied within groups, no data needed."""
    return RewardOutput(channels={"length": rollout.payload["completion_mask"].sum(1).double()})


class Prompts:
    group_size = GROUP

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __iter__(self):
        return self

    def __next__(self):
        return PROMPTS


def _grpo(info: DistInfo, run_dir: str) -> dict[str, Any]:
    policy = _policy()
    policy.__class__ = HalfRollouts
    policy.calls, policy.rank, policy.world_size = 0, info.rank, info.world_size
    batch = len(PROMPTS) * GROUP // info.world_size
    trainer = Trainer(policy=policy, strategy=GRPOStrategy(loss_type="dapo"), reward=length_reward,
                      dataloader=Prompts(batch), run_dir=f"{run_dir}/{info.rank}", dist=info,
                      optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2), lr_schedule=ConstantSchedule(0),
                      max_iterations=ITERATIONS, micro_batch_size=2, step_chunk_size=None, grad_accum_steps=None,
                      inner_epochs=1, max_grad_norm=None, save_interval=100, best_metric=None, best_mode="max",
                      resume=None, seed=0, progress=False, fused_rollout=False)
    trainer.fit()
    params = torch.cat([p.detach().flatten() for p in policy.module.parameters()])
    losses = torch.tensor([])
    if info.rank == 0:
        rows = [json.loads(x) for x in (Path(run_dir) / "0" / "metrics.jsonl").read_text().splitlines()]
        losses = torch.tensor([r["train/loss"] for r in rows])
    return {"params": params, "losses": losses}


def test_two_ranks_with_half_the_rollout_each_equal_one_process(tmp_path):
    start = torch.cat([p.detach().flatten() for p in _policy().module.parameters()])
    single = _grpo(DistInfo(0, 1, 0, torch.device("cpu")), str(tmp_path / "single"))
    assert (single["params"] - start).abs().max() > 1e-3  # the steps moved the weights
    ranks = run_ranks(_grpo, tmp_path / "ranks", str(tmp_path / "ddp"))
    for rank in ranks:
        torch.testing.assert_close(rank["params"], single["params"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], atol=1e-6, rtol=1e-5)
