"""Rank-sharded, resumable batch order for supervised training."""

import pytest
import torch

from elign.engine.errors import ConfigError
from elign.engine.sampler import ShardedBatchOrder


def draw(order, n):
    return [order.next_indices().tolist() for _ in range(n)]


def test_ranks_split_each_global_batch_and_share_the_state():
    single = ShardedBatchOrder(20, batch_size=6, seed=1)
    ranks = [ShardedBatchOrder(20, batch_size=3, seed=1) for _ in range(2)]
    for rank, order in enumerate(ranks):
        order.shard(rank, 2)
    for _ in range(7):  # crosses epochs (3 global batches of 6 per epoch of 20, last 2 dropped)
        whole = single.next_indices().tolist()
        parts = [order.next_indices().tolist() for order in ranks]
        assert parts[0] + parts[1] == whole
        assert not set(parts[0]) & set(parts[1]), "each rank sees different samples"
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    assert single.state_dict()["epoch"] == 2


def test_resume_continues_the_same_stream():
    straight = ShardedBatchOrder(11, batch_size=4, seed=5)
    expected = draw(straight, 9)
    first = ShardedBatchOrder(11, batch_size=4, seed=5)
    head = draw(first, 4)
    resumed = ShardedBatchOrder(11, batch_size=4, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + draw(resumed, 5) == expected


def test_epoch_is_a_permutation_and_last_batch_kept_without_drop_last():
    order = ShardedBatchOrder(10, batch_size=4, seed=0, drop_last=False)
    batches = draw(order, 3)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    assert order.state_dict() == {"epoch": 0, "position": 10}
    fresh = draw(order, 1)[0]  # the short batch ended epoch 0: the next one opens epoch 1
    assert order.state_dict() == {"epoch": 1, "position": 4}
    assert fresh == order._permutation(1)[:4].tolist()


def test_bad_shards_name_the_key():
    with pytest.raises(ConfigError, match="drop_last"):
        ShardedBatchOrder(10, 2, 0, drop_last=False).shard(0, 2)
    with pytest.raises(ConfigError, match="batch_size.*at most 3"):
        ShardedBatchOrder(10, 4, 0).shard(1, 3)
    with pytest.raises(ConfigError, match="batch_size"):
        ShardedBatchOrder(10, 11, 0)
    assert torch.equal(ShardedBatchOrder(10, 2, 3)._permutation(0), ShardedBatchOrder(10, 2, 3)._permutation(0))
