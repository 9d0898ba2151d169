"""An endless, resumable stream of shuffled mini-batches for supervised training.

Each epoch is a fresh permutation drawn from ``(seed, epoch)`` with a private generator, so the
stream does not depend on (or disturb) the global RNG, and ``state_dict()`` = (epoch, position)
is enough to resume exactly where a run stopped.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from elign.data.dataset import collate_qm9
from elign.engine.errors import check_int


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
        n = len(dataset)  # type: ignore[arg-type]
        # (with drop_last, a batch larger than the dataset would never be full)
        batch_size = check_int("batch_size", batch_size, 1, n if drop_last else None)
        self.dataset, self.batch_size, self.seed = dataset, batch_size, check_int("seed", seed)
        self.drop_last, self.collate = drop_last, collate
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        n = len(self._order)
        end = self.position + self.batch_size
        if end > n and (self.drop_last or self.position >= n):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
            end = self.batch_size
        index = self._order[self.position:min(end, n)]
        self.position = min(end, n)
        return self.collate([self.dataset[int(i)] for i in index])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
