"""GRPO prompts for conformer generation: molecules of a conformer data folder's split.

Each iteration draws ``batch_size // group_size`` molecules with torch's global RNG, which the
trainer reseeds from (seed, iteration, rank): draws are reproducible, a resumed run draws what the
uninterrupted one would have, and ranks draw different molecules (the engine's prompt-source
contract, as :class:`elign.edm.prompts.NodeCountPrompts`). Every prompt gets its own ``prompt_id``
(position and SMILES), so a molecule drawn twice in one batch forms two groups.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from elign.engine.errors import ConfigError, DataFormatError, check_int
from molgen_grpo.evaluate import prompt_text
from molgen_grpo.policy import Prompt
from molgen_grpo.references import ReferenceStore, split_smiles


class ConformerPrompts:
    """Endless source of ``[SMILES]s[/SMILES]`` prompts (implements the engine's ``PromptSource``)."""

    def __init__(self, data_dir: str, batch_size: int, group_size: int, split: str = "train",
                 max_molecules: int | None = None, reference_splits: Sequence[str] = ()) -> None:
        """
        Args:
            data_dir: conformer data folder (local or ``package:`` path).
            batch_size: completions per rank per iteration (prompts x group_size).
            group_size: ``K``, completions per prompt (TRL's ``num_generations``).
            split: the JSONL split whose molecules are prompted.
            max_molecules: prompt only the first this many molecules; None = all.
            reference_splits: JSONL splits that give references to molecules without a pickle (the
                reward's), so the check below sees what the reward will see.
        Raises:
            ConfigError: a batch size that is not a multiple of the group size.
            DataFormatError: a molecule of the split without references in the folder's mapping.
        """
        self.group_size = check_int("group_size", group_size, 1)
        multiple = f"a positive multiple of group_size={self.group_size}"
        self.batch_size = check_int("batch_size", batch_size, 1, allowed=multiple)
        if self.batch_size % self.group_size:
            raise ConfigError("batch_size", batch_size, multiple)
        limit = check_int("max_molecules", max_molecules, 1, allow_none=True, none_means="all")
        self.smiles = list(split_smiles(data_dir, split, limit))
        if not self.smiles:
            raise DataFormatError(f"{data_dir}/{split}.jsonl", None, "no molecules")
        store = ReferenceStore(data_dir, jsonl_splits=tuple(reference_splits))
        missing = [s for s in self.smiles if s not in store]
        if missing:
            raise DataFormatError(str(store.root / "smiles_to_pickle.json"), None,
                                  f"{len(missing)} molecules of {split}.jsonl have no references, e.g. {missing[0]}")
        self.num_prompts = self.batch_size // self.group_size

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def __next__(self) -> list[Prompt]:
        picks = torch.randint(0, len(self.smiles), (self.num_prompts,)).tolist()
        return [Prompt(f"{j}:{self.smiles[i]}", prompt_text(self.smiles[i])) for j, i in enumerate(picks)]
