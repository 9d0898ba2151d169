"""Endless, resumable, rank-sharded batches of dataset indices for supervised training.

Every rank draws the same permutation per epoch (from ``(seed, epoch)`` with a private generator,
so the global RNG is neither read nor disturbed) and takes its own slice of each global batch of
``world_size * batch_size`` indices. The state, ``(epoch, position)``, is the same on every rank,
so one checkpoint resumes all of them exactly.
"""

from __future__ import annotations

import torch

from elign.engine.errors import ConfigError, check_int


class ShardedBatchOrder:
    """Indices of the next batch of a map-style dataset of ``num_items`` items, forever."""

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        """
        Args:
            num_items: dataset size.
            batch_size: items per batch and rank.
            seed: seed of the per-epoch permutations.
            drop_last: skip each epoch's incomplete last batch (constant batch size).
        """
        # (with drop_last, a batch larger than the dataset would never be full)
        batch_size = check_int("batch_size", batch_size, 1, num_items if drop_last else None)
        self.num_items, self.batch_size, self.seed, self.drop_last = int(num_items), batch_size, check_int("seed", seed), drop_last
        self.rank, self.world_size = 0, 1
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def shard(self, rank: int, world_size: int) -> None:
        """Take slice ``rank`` of every global batch of ``world_size`` ranks."""
        if world_size > 1 and not self.drop_last:
            raise ConfigError("drop_last", self.drop_last, "true under torchrun (every rank needs a full batch)")
        if self.batch_size * world_size > self.num_items:
            raise ConfigError("batch_size", self.batch_size,
                              f"at most {self.num_items // world_size} with {world_size} ranks (dataset of {self.num_items})")
        self.rank, self.world_size = int(rank), int(world_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def next_indices(self) -> torch.Tensor:
        """``[batch_size]`` long indices of this rank's next batch (fewer at an epoch's end without drop_last)."""
        n, step = self.num_items, self.batch_size * self.world_size
        if self.position + step > n and (self.drop_last or self.position >= n):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        index = self._order[start:min(start + self.batch_size, n)]
        self.position = min(self.position + step, n)
        return index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
