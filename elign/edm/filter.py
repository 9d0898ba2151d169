"""Validity, duplicate and novelty penalties injected into every reward channel (spec elign.md §2.5).

Penalties are added to the terminal value of every channel. For a shaped channel that is also
the terminal potential Psi_T, so the penalty reaches every per-step return. RDKit validity and
uniqueness are logged every iteration, whatever penalties are configured.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from elign.chem.metrics import load_reference_smiles
from elign.chem.rdkit_mol import smiles_batch
from elign.edm.force_reward import QM9_ATOMIC_NUMBERS
from elign.engine.errors import ConfigError, check_range
from elign.engine.rollout import RewardOutput, Rollout


class ChemistryFilter:
    """RDKit validity / uniqueness / novelty of the sampled molecules, turned into penalties."""

    def __init__(self, invalid_penalty: float, duplicate_penalty: float, novelty_penalty: float, dedup: bool,
                 reference_smiles: str | None, rank_channel: str) -> None:
        """
        Args:
            invalid_penalty: invalid molecules get (lowest valid value of the channel) - this; 0 = off.
            duplicate_penalty: d; a SMILES seen c times costs each copy d (c - 1) / c (all of it on the
                kept copy when dedup is on); 0 = off.
            novelty_penalty: p subtracted from molecules that are invalid or in the reference set; 0 = off.
            dedup: keep one molecule per SMILES (the best in ``rank_channel``) and all invalid ones;
                the dropped ones leave the advantage statistics and the loss.
            reference_smiles: file with one SMILES per line (the training set) for novelty; None = none.
            rank_channel: channel that picks which duplicate is kept.
        """
        for key, value in (("invalid_penalty", invalid_penalty), ("duplicate_penalty", duplicate_penalty),
                           ("novelty_penalty", novelty_penalty)):
            check_range(key, value, 0.0)  # 0 = off
        if novelty_penalty > 0 and reference_smiles is None:
            raise ConfigError("reference_smiles", None, "a SMILES file when novelty_penalty > 0")
        self.invalid_penalty, self.duplicate_penalty = float(invalid_penalty), float(duplicate_penalty)
        self.novelty_penalty, self.dedup, self.rank_channel = float(novelty_penalty), bool(dedup), rank_channel
        self.reference: frozenset[str] | None = None
        if reference_smiles is not None:
            path = Path(reference_smiles)
            if not path.is_file():
                raise ConfigError("reference_smiles", reference_smiles, "an existing SMILES file")
            self.reference = load_reference_smiles(path)

    def smiles(self, rollout: Rollout) -> list[str | None]:
        mask = rollout.payload["node_mask"].bool().cpu().numpy()
        numbers = np.asarray(QM9_ATOMIC_NUMBERS)[rollout.payload["atom_types"].clamp(0, 4).cpu().numpy()]
        return smiles_batch(rollout.payload["positions"].double().cpu().numpy(), np.where(mask, numbers, 1), mask)

    def __call__(self, rollout: Rollout, reward: RewardOutput) -> RewardOutput:
        smiles = self.smiles(rollout)
        b = len(smiles)
        valid = torch.tensor([s is not None for s in smiles])
        counts = Counter(s for s in smiles if s is not None)
        n_valid = int(valid.sum())
        metrics = {"rollout/validity": n_valid / b, "rollout/uniqueness": len(counts) / max(n_valid, 1),
                   "rollout/validity_x_uniqueness": len(counts) / b}
        if self.reference is not None:
            novel = [s is not None and s not in self.reference for s in smiles]
            metrics["rollout/novelty"] = len({s for s, n in zip(smiles, novel) if n}) / max(len(counts), 1)

        keep = torch.ones(b, dtype=torch.bool)
        if self.dedup:
            rank = reward.channels.get(self.rank_channel)
            if rank is None:
                raise KeyError(f"filter.rank_channel={self.rank_channel!r} is not a reward channel: {sorted(reward.channels)}")
            best: dict[str, int] = {}
            for i, s in enumerate(smiles):
                # NaN (failed evaluation) never wins against a scored copy.
                score = float(torch.nan_to_num(rank[i].double(), nan=-np.inf))
                if s is not None and (s not in best or score > float(torch.nan_to_num(rank[best[s]].double(), nan=-np.inf))):
                    best[s] = i
            keep = torch.tensor([s is None or best[s] == i for i, s in enumerate(smiles)])

        penalty = torch.zeros(b, dtype=torch.float64)
        if self.duplicate_penalty > 0:
            for i, s in enumerate(smiles):
                if s is not None and counts[s] > 1:
                    c = counts[s]
                    penalty[i] += self.duplicate_penalty * ((c - 1) if self.dedup else (c - 1) / c)
        if self.novelty_penalty > 0:
            for i, s in enumerate(smiles):
                if s is None or s in self.reference:  # type: ignore[operator]
                    penalty[i] += self.novelty_penalty
        channels = {}
        for name, values in reward.channels.items():
            v = values.double().cpu() - penalty
            if self.invalid_penalty > 0 and (~valid).any():
                scored = v[valid & ~torch.isnan(v)]
                floor = scored.min() if scored.numel() else torch.nan_to_num(v, nan=0.0).min()
                v = torch.where(valid | torch.isnan(v), v, floor - self.invalid_penalty)
            channels[name] = v.to(values)
        reward.channels = channels
        reward.keep = keep.to(reward.channels[next(iter(channels))].device) if self.dedup else reward.keep
        reward.metrics.update(metrics)
        return reward
