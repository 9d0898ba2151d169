"""Data-parallel updates: two gloo ranks on half the batch each == one process on the whole batch."""

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from elign.engine.distributed import DistInfo, reduce_mean
from elign.engine.rollout import Rollout
from elign.engine.schedule import ConstantSchedule
from elign.engine.strategies.fed_grpo import FedGRPOStrategy
from elign.engine.trainer import Trainer
from tests.elign.engine.ddp_harness import run_ranks
from tests.elign.engine.toy import FusedCategoricalPolicy, TargetTokenReward, ToyPrompts

B, T = 8, 6


def fixed_batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 4, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    logp_old = torch.full((B, T), -1.3863) + 0.01 * torch.randn(B, T, generator=g)
    rollout = Rollout(group_ids=torch.arange(B) // 4, logp_old=logp_old,
                      step_mask=torch.ones(B, T, dtype=torch.bool), payload={"tokens": tokens})
    return rollout, adv


def one_update(info: DistInfo, index: torch.Tensor, tmp: str, inner_epochs: int = 1) -> torch.Tensor:
    """One iteration's update on samples ``index`` of the fixed batch; ``inner_epochs`` 0 means one
    epoch from gradients taken while sampling (``fused_rollout``, which averages over ranks by hand)."""
    torch.manual_seed(0)
    fused, inner_epochs = inner_epochs == 0, max(inner_epochs, 1)
    policy = FusedCategoricalPolicy(num_steps=T, vocab=4)
    with torch.no_grad():
        policy.module.logits.copy_(torch.randn(T, 4, generator=torch.Generator().manual_seed(1)))
    strategy = FedGRPOStrategy({"score": 1.0}, 1.0, "terminal", 1.0, None, 1e-8, 0.2, 0.0)
    trainer = Trainer(policy, strategy, TargetTokenReward(), ToyPrompts(len(index), 4), tmp, info,
                      functools.partial(torch.optim.SGD, lr=1.0), ConstantSchedule(0), 1, len(index), 3, 1,
                      inner_epochs, None, 1, None, "max", None, 0, False, fused_rollout=fused)
    rollout, adv = fixed_batch()
    if fused:  # one advantage per sample
        rollout = rollout.select(index)
        trainer.fused_update(rollout, adv[index, :1].expand(-1, T), policy.gradients(rollout))
    else:
        trainer.replay(rollout.select(index), adv[index])
    return policy.module.logits.detach().clone()


def _update_on_half(info: DistInfo, tmp: str, inner_epochs: int) -> dict[str, Any]:
    """One rank's part: the update on its half of the batch, then a metric reduction in which each
    rank has a key the other lacks."""
    half = torch.arange(info.rank * B // 2, (info.rank + 1) * B // 2)
    params = one_update(info, half, tmp, inner_epochs)
    reduced = reduce_mean({"x": float(info.rank), f"only_{info.rank}": 1.0}, info)
    return {"params": params, "reduced": reduced}


@pytest.mark.parametrize("inner_epochs", [1, 2, 0], ids=["one-step", "two-steps-recompute-pass", "fused-rollout"])
def test_two_ranks_match_one_process_and_metrics_reduce(tmp_path, inner_epochs):
    # Two inner epochs take two optimizer steps, so the old log-probs come from the recompute pass,
    # which runs forwards through DDP with no backward after them.
    single = one_update(DistInfo(0, 1, 0, torch.device("cpu")), torch.arange(B), str(tmp_path / "single"),
                        inner_epochs)
    ranks = run_ranks(_update_on_half, tmp_path / "ranks", str(tmp_path / "ddp"), inner_epochs)
    for result in ranks:  # both replicas take the same step
        torch.testing.assert_close(result["params"], single, atol=1e-6, rtol=1e-5)
        assert result["reduced"] == {"x": 0.5, "only_0": 0.5, "only_1": 0.5}


def _wrap_in_ddp(info: DistInfo) -> None:
    """What the trainer does once the group is up: DistributedDataParallel's first construction
    imports torch.distributed.nn, whose default arguments would then hold the group."""
    model = DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(2, 3)).sum().backward()


def test_ddp_leaves_no_group_threads_after_shutdown(tmp_path):
    # The harness fails a rank whose gloo threads outlive shutdown.
    run_ranks(_wrap_in_ddp, tmp_path / "ranks")


_KEPT: list[Any] = []


def _keep_group(info: DistInfo) -> None:
    dist.all_reduce(torch.ones(1))
    _KEPT.append(dist.group.WORLD)


def test_harness_reports_a_group_that_outlives_shutdown(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="still running after shutdown"):
        run_ranks(_keep_group, tmp_path / "ranks")


def _supervised(info: DistInfo, tmp: str, batch_size: int) -> dict[str, Any]:
    """Three supervised steps with gradient accumulation 2; each rank draws its own shard."""
    from elign.engine.sampler import ShardedBatchOrder
    from tests.elign.engine.test_supervised import DATA, make

    trainer = make(f"{tmp}/{info.rank}", 3, batch_size=batch_size, grad_accum_steps=2, dist=info)
    trainer.fit()
    replica = ShardedBatchOrder(len(DATA), batch_size, seed=3)  # the batches this rank drew (same seed)
    replica.shard(info.rank, info.world_size)
    seen = torch.stack([replica.next_indices() for _ in range(6)])  # 3 steps x 2 accumulated batches
    assert replica.state_dict() == trainer.prompts.state_dict(), "the trainer drew exactly these batches"
    return {"params": trainer.policy.module.logits.detach().clone(), "seen": seen,
            "state": torch.tensor(list(trainer.prompts.state_dict().values()))}


def test_supervised_ranks_see_different_samples_and_match_one_process(tmp_path):
    """Two ranks with batches of 4 (data sharded) take the steps of one process with batches of 8."""
    single = _supervised(DistInfo(0, 1, 0, torch.device("cpu")), str(tmp_path / "single"), 8)
    ranks = run_ranks(_supervised, tmp_path / "ranks", str(tmp_path / "ddp"), 4)
    for rank in ranks:
        torch.testing.assert_close(rank["params"], single["params"], atol=1e-6, rtol=1e-5)
        assert torch.equal(rank["state"], single["state"]), "every rank resumes from the same data position"
    first, second = ranks[0]["seen"], ranks[1]["seen"]
    for a, b in zip(first.tolist(), second.tolist()):  # every batch drawn at the same step
        assert not set(a) & set(b), "each rank sees different samples"
    # together, the ranks' batches are the single process's batches
    assert torch.equal(torch.cat([first, second], dim=1), single["seen"])
