"""The masked-LM prompt dataset: lobster's shape (300 rows, 90/5/5, seed 42) with valid SMILES and tags the reward
reads; files readable by datasets and as JSON; the prompt source and its file errors."""

import json

import pytest
import torch
from rdkit import Chem

from elign.engine.errors import ConfigError, DataFormatError
from molgen_grpo.mlm_prompts import MaskedLMPrompts, main, qm9_smiles, read_rows, synthetic_rows
from molgen_grpo.modality import parse_completion


def test_rows_are_valid_and_their_tags_are_the_rewards():
    rows = synthetic_rows(qm9_smiles())
    assert len(rows) == 300 and [sum(r["modality"] == m for r in rows) for m in ("smiles", "protein", "dna")] == \
        [100, 100, 100]
    assert rows == synthetic_rows(qm9_smiles())  # seed 42: the same rows every time
    for row in rows:
        parsed = parse_completion(row["completion"])
        assert parsed.modality == row["modality"] and parsed.reason is None
        assert f"<{'protein' if row['modality'] == 'protein' else row['modality']}>" in row["prompt"]
        if row["modality"] == "smiles":
            assert Chem.MolFromSmiles(parsed.sequence) is not None
    assert all("<amino_acid>" not in r["prompt"] for r in rows)


def test_saved_splits_load_with_datasets_and_as_json(tmp_path):
    from datasets import load_from_disk

    counts = main(["--out", str(tmp_path / "ds")])
    assert counts == {"train": 270, "validation": 15, "test": 15, "full": 300}
    loaded = load_from_disk(str(tmp_path / "ds" / "hf"))
    assert len(loaded["train"]) == 270 and set(loaded["train"].column_names) == {
        "prompt_id", "prompt", "completion", "modality"}
    assert json.loads((tmp_path / "ds" / "test.json").read_text()) == loaded["test"].to_list()
    ids = {r["prompt_id"] for s in ("train", "validation", "test") for r in loaded[s].to_list()}
    assert len(ids) == 300  # the three splits partition the rows


def test_prompt_source_reads_folders_and_jsonl(tmp_path):
    main(["--out", str(tmp_path / "ds")])
    torch.manual_seed(0)
    source = MaskedLMPrompts(str(tmp_path / "ds"), batch_size=8, group_size=4)
    batch = next(source)
    assert len(batch) == 2 and all(p.modality in ("smiles", "protein", "dna") for p in batch)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Write <dna>", "modality": "dna"}\n\n{"prompt": "x", "modality": "rna"}\n')
    with pytest.raises(DataFormatError, match=r"p.jsonl:3: 'modality' must be one of"):
        read_rows(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text('{"prompt": "Write <dna>", "modality": "dna"}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"q.jsonl:2: not JSON"):
        read_rows(tmp_path / "q.jsonl")
    with pytest.raises(ConfigError, match="batch_size"):
        MaskedLMPrompts(str(tmp_path / "ds"), batch_size=6, group_size=4)
