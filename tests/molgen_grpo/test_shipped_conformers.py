"""The conformer dataset shipped in molgen_grpo/data/qm9_conformers (built by scripts/build_molgen_data.py)
is consistent: every line decodes to its SMILES's graph, splits are disjoint by molecule, the mapping
covers valid + test with relative paths to loadable pickles that hold the JSONL's conformers."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from rdkit import Chem

from molgen_grpo.conformers import MAPPING_NAME, SPLITS
from molgen_grpo.pickles import load_pickle
from molgen_grpo.pretraining import SHIPPED_DATA
from molgen_grpo.text import decode, same_graph, strip_smiles
from molgen_grpo.tokenizer import resolve_path

FOLDER = Path(resolve_path(SHIPPED_DATA))
pytestmark = pytest.mark.skipif(not (FOLDER / MAPPING_NAME).is_file(), reason="conformer dataset not built")


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict[str, str]]]:
    return {split: [json.loads(x) for x in (FOLDER / f"{split}.jsonl").read_text().splitlines()] for split in SPLITS}


def test_every_line_decodes_with_its_smiles_graph(rows):
    for split, records in rows.items():
        assert records, split
        for n, row in enumerate(records, start=1):
            where = f"{split}.jsonl:{n}"
            assert set(row) == {"canonical_smiles", "embedded_smiles"}, where
            assert strip_smiles(row["embedded_smiles"]) == row["canonical_smiles"], where
            mol = decode(row["embedded_smiles"])
            assert same_graph(Chem.MolToSmiles(mol), row["canonical_smiles"]), where


def test_splits_are_disjoint_by_molecule_and_capped(rows):
    molecules = {split: Counter(r["canonical_smiles"] for r in records) for split, records in rows.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(molecules[a]) & set(molecules[b]), (a, b)
    assert max(max(c.values()) for c in molecules.values()) <= 30
    total = sum(len(c) for c in molecules.values())
    assert abs(len(molecules["train"]) - 0.8 * total) <= 1 and abs(len(molecules["valid"]) - 0.1 * total) <= 1


def test_mapping_covers_valid_and_test_with_loadable_references(rows):
    mapping = json.loads((FOLDER / MAPPING_NAME).read_text())
    texts: dict[str, list[str]] = defaultdict(list)
    for split in ("valid", "test"):
        for row in rows[split]:
            texts[row["canonical_smiles"]].append(row["embedded_smiles"])
    assert set(mapping) == set(texts)
    for smiles, relative in mapping.items():
        assert not Path(relative).is_absolute() and re.fullmatch(r"references/(valid|test)/line\d{6}\.pickle", relative)
        refs = load_pickle(FOLDER / relative)
        assert isinstance(refs, list) and len(refs) == len(texts[smiles])
        assert all(isinstance(m, Chem.Mol) and m.GetNumConformers() == 1 for m in refs)
        assert same_graph(Chem.MolToSmiles(Chem.RemoveHs(refs[0])), smiles)


def test_readme_counts_match_the_files(rows):
    readme = (FOLDER / "README.md").read_text()
    assert "python scripts/build_molgen_data.py" in readme
    for split, records in rows.items():
        molecules = len({r["canonical_smiles"] for r in records})
        assert re.search(rf"^\| {split} \| {molecules} \| {len(records)} \|", readme, re.M), split
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size < 5e6, f"{FOLDER} holds {size / 1e6:.1f} MB; the shipped dataset should stay a few MB"
