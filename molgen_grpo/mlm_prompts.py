"""Prompts for masked-LM rewards: lobster's synthetic dataset done right, and a prompt source for the engine.

    python -m molgen_grpo.mlm_prompts --out molgen_grpo/data/mlm_prompts     # the shipped dataset

:func:`synthetic_rows` is lobster's ``generate_synthetic_dataset.py`` (seed 42; 100 rows per modality; one
instruction per modality; a ``completion`` column GRPO does not use) with two defects fixed: the SMILES are
real, RDKit-valid QM9 molecules (the embedded conformer set's, not random strings that mostly fail to
parse), and every prompt asks for the tag the reward reads (``<protein>``, not ``<amino_acid>``). Protein
(20-100 residues) and DNA (50-200 nt) completions are random, as lobster's. Rows carry ``prompt_id`` and
``modality`` (the reward's metadata source). Splits 90 / 5 / 5 by two ``train_test_split(seed=42)`` calls
plus ``full``, saved with ``DatasetDict.save_to_disk`` and as ``<split>.json``.

:class:`MaskedLMPrompts` reads such a folder (``<split>.json``), or any JSON / JSONL file of rows with a
``prompt`` column and a ``modality`` column, and yields :class:`molgen_grpo.policy.Prompt` batches.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from elign.engine.errors import ConfigError, DataFormatError, check_int
from elign.engine.paths import resolve_package_path
from molgen_grpo.modality import MODALITIES
from molgen_grpo.policy import Prompt

SEED = 42
ROWS_PER_MODALITY = 100
INSTRUCTIONS = {
    "smiles": "Generate a valid SMILES string for a small organic molecule. Write it between <smiles> and </smiles>.",
    "protein": "Generate a protein amino-acid sequence. Write it between <protein> and </protein>.",
    "dna": "Generate a DNA sequence. Write it between <dna> and </dna>.",
}
TAG = {"smiles": "smiles", "protein": "protein", "dna": "dna"}
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
DEFAULT_SMILES = "package:molgen_grpo/data/qm9_conformers"


def qm9_smiles(data_dir: str = DEFAULT_SMILES) -> list[str]:
    """The distinct canonical SMILES of the embedded QM9 conformer set (all splits), in file order."""
    from molgen_grpo.references import split_smiles

    out: dict[str, None] = {}
    for split in ("train", "valid", "test"):
        out.update(dict.fromkeys(split_smiles(data_dir, split)))
    return list(out)


def synthetic_rows(smiles: Sequence[str], seed: int = SEED, per_modality: int = ROWS_PER_MODALITY) -> list[dict]:
    """``3 * per_modality`` rows ``{prompt_id, prompt, completion, modality}`` (module docstring)."""
    rng = random.Random(seed)
    completions = {
        "smiles": rng.sample(list(smiles), per_modality),
        "protein": ["".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(20, 100))) for _ in range(per_modality)],
        "dna": ["".join(rng.choice("ACGT") for _ in range(rng.randint(50, 200))) for _ in range(per_modality)],
    }
    rows = []
    for modality in MODALITIES:
        for text in completions[modality]:
            rows.append({"prompt_id": len(rows), "prompt": INSTRUCTIONS[modality],
                         "completion": f"<{TAG[modality]}>{text}</{TAG[modality]}>", "modality": modality})
    return rows


def save_splits(rows: list[dict], out: Path, seed: int = SEED) -> dict[str, int]:
    """90 / 5 / 5 splits (two ``train_test_split`` calls) and ``full``: ``save_to_disk(out / "hf")`` and
    ``out / <split>.json``; returns the row count per split."""
    from datasets import Dataset, DatasetDict

    full = Dataset.from_list(rows)
    first = full.train_test_split(test_size=0.1, seed=seed)
    second = first["test"].train_test_split(test_size=0.5, seed=seed)
    splits = DatasetDict({"train": first["train"], "validation": second["train"], "test": second["test"],
                          "full": full})
    out.mkdir(parents=True, exist_ok=True)
    splits.save_to_disk(str(out / "hf"))
    for name, split in splits.items():
        (out / f"{name}.json").write_text(json.dumps(split.to_list(), indent=1) + "\n")
    return {name: len(split) for name, split in splits.items()}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON list or a JSONL file; each needs ``prompt`` and a ``modality`` among the modalities.

    Raises:
        DataFormatError: naming the file and line (JSONL) or row (JSON) at fault.
    """
    path = Path(resolve_package_path(str(path)))
    if not path.is_file():
        raise DataFormatError(str(path), None, "no such file")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataFormatError(str(path), line_no, f"not JSON ({exc.msg})") from None
    else:
        try:
            rows = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise DataFormatError(str(path), exc.lineno, f"not JSON ({exc.msg})") from None
    out = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataFormatError(str(path), where, "a row needs a string 'prompt'")
        if row.get("modality") not in MODALITIES:
            raise DataFormatError(str(path), where, f"'modality' must be one of {MODALITIES}, got {row.get('modality')!r}")
        out.append(row)
    if not out:
        raise DataFormatError(str(path), None, "no rows")
    return out


class MaskedLMPrompts:
    """Endless source of prompt batches (the engine's ``PromptSource``) from a prompt dataset.

    Args:
        path: a dataset folder written by this module (``<split>.json`` is read) or a JSON / JSONL file.
        split: the split of a folder.
        batch_size: completions per rank and iteration (prompts x group_size).
        group_size: completions per prompt (G).
    """

    def __init__(self, path: str, batch_size: int, group_size: int, split: str = "train") -> None:
        self.group_size = check_int("group_size", group_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        if self.batch_size % self.group_size:
            raise ConfigError("batch_size", batch_size, f"a positive multiple of group_size={self.group_size}")
        resolved = Path(resolve_package_path(path))
        self.rows = read_rows(resolved / f"{split}.json" if resolved.is_dir() else resolved)
        self.num_prompts = self.batch_size // self.group_size

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def __next__(self) -> list[Prompt]:
        picks = torch.randint(0, len(self.rows), (self.num_prompts,)).tolist()
        return [Prompt(f"{j}:{self.rows[i].get('prompt_id', i)}", self.rows[i]["prompt"], self.rows[i]["modality"])
                for j, i in enumerate(picks)]


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (hf/ and <split>.json)")
    parser.add_argument("--smiles-data", default=DEFAULT_SMILES, help="conformer data folder whose SMILES are used")
    parser.add_argument("--seed", type=int, default=SEED, help="generation and split seed (lobster: 42)")
    args = parser.parse_args(argv)
    counts = save_splits(synthetic_rows(qm9_smiles(args.smiles_data), args.seed), args.out, args.seed)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main()
