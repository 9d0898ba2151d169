"""Unconditional EDM prompts: a prompt is a node count drawn from the QM9 size histogram."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.distributions import Categorical

from elign.engine.errors import ConfigError, check_int, check_range

# Atoms per QM9 molecule (with hydrogens) -> number of molecules, in upstream EDM's source order
# (configs/datasets_config.py, qm9_with_h). The order matters: the categorical distribution is built
# in insertion order, so seeded size draws match upstream only with this exact order. 28 is absent.
QM9_NODE_COUNTS: dict[int, int] = {
    22: 3393, 17: 13025, 23: 4848, 21: 9970, 19: 13832, 20: 9482, 16: 10644, 13: 3060,
    15: 7796, 25: 1506, 18: 13364, 12: 1689, 11: 807, 24: 539, 14: 5136, 26: 48, 7: 16, 10: 362,
    8: 49, 9: 124, 27: 266, 4: 4, 29: 25, 6: 9, 5: 5, 3: 1,
}  # fmt: skip

HISTOGRAMS: dict[str, dict[int, int]] = {"qm9": QM9_NODE_COUNTS}


class NodeCountPrompts:
    """Endless source of node-count prompts (implements the engine's ``PromptSource``).

    Each ``next()`` returns a LongTensor ``[P]`` of atom counts, ``P = batch_size // group_size``,
    drawn with torch's global RNG (the trainer reseeds it every iteration, which makes draws
    reproducible). The policy then samples ``group_size`` molecules per prompt.

    Args:
        batch_size: molecules per rank per iteration (``P * K``).
        group_size: ``K``, molecules per prompt (one GRPO group).
        histogram: name of the size histogram (``"qm9"``).
        focus_min: lower end of a node-count range whose mass is multiplied by ``focus_factor``
            (None: the smallest count of the histogram when ``focus_max`` is set).
        focus_max: upper end of that range (None: the largest count when ``focus_min`` is set).
        focus_factor: multiplier for the mass inside ``[focus_min, focus_max]``; the distribution
            is renormalised afterwards. 1 disables the reweighting.
    """

    def __init__(
        self,
        batch_size: int,
        group_size: int,
        histogram: str = "qm9",
        focus_min: int | None = None,
        focus_max: int | None = None,
        focus_factor: float = 1.0,
    ) -> None:
        self.group_size = check_int("group_size", group_size, 1)
        multiple = f"a positive multiple of group_size={self.group_size}"
        self.batch_size = check_int("batch_size", batch_size, 1, allowed=multiple)
        if self.batch_size % self.group_size != 0:
            raise ConfigError("batch_size", batch_size, multiple)
        if histogram not in HISTOGRAMS:
            raise ConfigError("histogram", histogram, sorted(HISTOGRAMS))
        check_range("focus_factor", focus_factor, 0.0, low_open=True)
        check_int("focus_min", focus_min, allow_none=True, none_means="the smallest count")
        check_int("focus_max", focus_max, allow_none=True, none_means="the largest count")
        self.num_prompts = self.batch_size // self.group_size
        counts = HISTOGRAMS[histogram]
        self.node_counts = torch.tensor(list(counts.keys()), dtype=torch.long)
        mass = torch.tensor(list(counts.values()), dtype=torch.float64)
        if focus_min is not None or focus_max is not None:
            lo = int(focus_min) if focus_min is not None else int(self.node_counts.min())
            hi = int(focus_max) if focus_max is not None else int(self.node_counts.max())
            if lo > hi:
                raise ConfigError("focus_min", focus_min, f"at most focus_max={focus_max}")
            inside = (self.node_counts >= lo) & (self.node_counts <= hi)
            if not bool(inside.any()):
                raise ConfigError("focus_min", focus_min, f"a range overlapping the {histogram} node counts")
            mass = torch.where(inside, mass * float(focus_factor), mass)
        # float64 probabilities, like upstream's DistributionNodes, so seeded draws agree with it.
        self.probs = mass / mass.sum()
        self._dist = Categorical(probs=self.probs)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        """LongTensor ``[P]`` of node counts."""
        return self.node_counts[self._dist.sample((self.num_prompts,))]
