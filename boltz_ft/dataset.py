"""The SFT data source: structure targets, re-cropped and re-featurized every step, in the batch schema.

Targets are read once (boltz's parser, CCD molecules from biotite); every draw featurizes a fresh random
crop (boltz's cropper) and fresh reference-conformer rotations, as boltz's training data module does.
Which target and which seed a draw uses depends only on (seed, draw index, rank), so a resumed run
draws exactly the batches the uninterrupted run would (the draw index is in the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from elign.engine.errors import ConfigError, check_int
from elign.engine.paths import resolve_package_path
from boltz_ft.ccd import CCDMolecules
from boltz_ft.data import STRUCTURE_SUFFIXES, Target, featurize, load_structure, split_batch, stack_batches

__all__ = ["StructureBatches", "find_structures", "load_targets"]

ATOMS_PER_TOKEN = 16
"""Padded atoms per token when a crop sets ``max_tokens`` but not ``max_atoms`` (proteins average ~8
heavy atoms per residue; TRP has 14): every crop of a run then has one shape and batches stack."""


def find_structures(paths: Sequence[str]) -> list[Path]:
    """Structure files named by ``paths`` (files or folders; ``package:`` paths allowed), sorted per folder."""
    found: list[Path] = []
    for raw in paths:
        path = Path(resolve_package_path(str(raw)))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in STRUCTURE_SUFFIXES)
            if not files:
                raise ConfigError("dataloader.paths", str(raw), f"a folder holding {STRUCTURE_SUFFIXES} files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError("dataloader.paths", str(raw), "existing structure files or folders")
    return found


def load_targets(paths: Sequence[str], mols: CCDMolecules, ids: Sequence[str] | None = None,
                 rcsb_root: str | None = None) -> list[Target]:
    """Parse the structure files of ``paths`` and/or the targets of a processed RCSB folder."""
    targets = [load_structure(p, mols) for p in find_structures(paths)] if paths else []
    if rcsb_root is not None:
        from boltz_ft.rcsb import RCSBTargets

        rcsb = RCSBTargets(resolve_package_path(rcsb_root), mols=mols)
        targets.extend(rcsb.load(i) for i in rcsb.ids)
    if ids is not None:
        by_id = {t.id: t for t in targets}
        missing = sorted(set(ids) - set(by_id))
        if missing:
            raise ConfigError("dataloader.ids", missing, f"ids among {sorted(by_id)}")
        targets = [by_id[i] for i in ids]
    if not targets:
        raise ConfigError("dataloader.paths", list(paths), "at least one structure target")
    return targets


class StructureBatches:
    """Batches of cropped, featurized targets for supervised fine-tuning (``next()`` -> batch schema).

    Args:
        paths: structure files or folders (``package:boltz_ft/data/pdb`` = the three shipped targets).
        ids: target ids (file stems) to keep, in this order; None = all.
        rcsb_root: a folder in boltz's processed RCSB layout to add (``boltz_ft.rcsb``); None = none.
        batch_size: targets per batch (each cropped and padded to ``max_tokens`` / ``max_atoms``).
        max_tokens: crop size in tokens (residues); None = whole targets (then batch_size must be 1).
        max_atoms: padded atoms per crop; None = ``16 * max_tokens``.
        max_seqs: MSA rows per target (query-only unless the target has an MSA).
        seed: seed of the target order and the crops.
    """

    group_size = 1  # no groups in supervised training (the engine reads it)

    def __init__(self, paths: Sequence[str], ids: Sequence[str] | None = None, rcsb_root: str | None = None,
                 batch_size: int = 1, max_tokens: int | None = 64, max_atoms: int | None = None, max_seqs: int = 64,
                 seed: int = 0) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_tokens = check_int("max_tokens", max_tokens, 1, allow_none=True, none_means="whole targets")
        if self.max_tokens is None and self.batch_size > 1:
            raise ConfigError("dataloader.max_tokens", None, "an integer when batch_size > 1 (crops must stack)")
        default_atoms = None if self.max_tokens is None else ATOMS_PER_TOKEN * self.max_tokens
        self.max_atoms = check_int("max_atoms", max_atoms, 32, allow_none=True, none_means="16 x max_tokens")
        self.max_atoms = default_atoms if self.max_atoms is None else self.max_atoms
        if self.max_atoms is not None and self.max_atoms % 32:
            raise ConfigError("dataloader.max_atoms", self.max_atoms, "a multiple of 32 (boltz's atom windows)")
        self.max_seqs = check_int("max_seqs", max_seqs, 1)
        self.seed = int(seed)
        self.mols = CCDMolecules()
        self.targets = load_targets(list(paths or []), self.mols, ids, rcsb_root)
        self.draws = 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Each rank draws its own targets and crops (rank r takes every world_size-th draw)."""
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def _target_index(self, draw: int) -> int:
        """The target of a global draw: a fresh permutation of the targets per epoch."""
        epoch, position = divmod(draw, len(self.targets))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.targets))
        return int(order[position])

    def item(self, draw: int) -> dict[str, Any]:
        """The featurized crop of global draw ``draw`` (deterministic in seed and draw)."""
        target = self.targets[self._target_index(draw)]
        feats = featurize(target, self.mols, seed=self.seed * 1_000_003 + draw, max_tokens=self.max_tokens,
                          max_atoms=self.max_atoms, max_seqs=self.max_seqs, training=True)
        tokens = int(feats["token_pad_mask"].sum())
        return split_batch(feats, {"pdb_id": target.id, "source": target.source, "n_tokens": tokens,
                                   "n_atoms": int(feats["atom_pad_mask"].sum()), "draw": draw})

    def __next__(self) -> dict[str, Any]:
        items = []
        for _ in range(self.batch_size):
            items.append(self.item(self.draws * self.world_size + self.rank))
            self.draws += 1
        return items[0] if len(items) == 1 else stack_batches(items)

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])

    def metrics(self) -> dict[str, float]:
        return {"data/draws": float(self.draws)}
