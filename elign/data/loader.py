"""An endless, resumable stream of shuffled mini-batches for supervised training.

The order (per-epoch permutations, rank shards, resumable position) is the engine's
``ShardedBatchOrder``; this class adds the dataset and the collate function.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import Dataset

from elign.data.dataset import collate_qm9
from elign.engine.errors import check_int
from elign.engine.sampler import ShardedBatchOrder


class MoleculeBatches:
    """Shuffled batches of a map-style dataset, forever (implements the engine's ``PromptSource``)."""

    group_size = 1  # supervised data has no groups

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, drop_last: bool = True,
                 collate: Callable[[Sequence[Any]], Any] = collate_qm9) -> None:
        """
        Args:
            dataset: map-style dataset (e.g. ``QM9SampleDataset`` or ``QM9Dataset``).
            batch_size: molecules per batch.
            seed: seed of the per-epoch permutations.
            drop_last: skip the last incomplete batch of each epoch (constant batch size).
            collate: list of items -> batch.
        """
        self.dataset, self.collate = dataset, collate
        self.order = ShardedBatchOrder(len(dataset), batch_size, check_int("seed", seed), drop_last)  # type: ignore[arg-type]
        self.batch_size = int(batch_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Under torchrun: this rank takes its own slice of each global batch (see ``ShardedBatchOrder``)."""
        self.order.shard(rank, world_size)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.collate([self.dataset[int(i)] for i in self.order.next_indices()])

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)
