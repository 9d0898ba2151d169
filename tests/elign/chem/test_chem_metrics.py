"""Validity / uniqueness / novelty on a hand-computed list; reference SMILES loader."""

from __future__ import annotations

import pytest

pytest.importorskip("rdkit")

from elign.chem.metrics import load_reference_smiles, validity_uniqueness_novelty  # noqa: E402


def test_hand_computed_metrics():
    smiles = ["C", "CC", None, "C", "O", None, "CCO"]
    # valid: C, CC, C, O, CCO (5 of 7); unique: C, CC, O, CCO (4 of 5); novel vs {C, O}: CC, CCO (2 of 4)
    out = validity_uniqueness_novelty(smiles, frozenset({"C", "O"}))
    assert out == {
        "num_total": 7, "num_valid": 5, "num_unique": 4, "num_novel": 2,
        "validity": 5 / 7, "uniqueness": 4 / 5, "novelty": 2 / 4,
    }
    no_ref = validity_uniqueness_novelty(smiles, None)
    assert no_ref["novelty"] is None and no_ref["num_novel"] is None and no_ref["uniqueness"] == 4 / 5


def test_empty_and_all_invalid():
    assert validity_uniqueness_novelty([], set())["validity"] == 0.0
    out = validity_uniqueness_novelty([None, None], {"C"})
    assert (out["validity"], out["uniqueness"], out["novelty"], out["num_novel"]) == (0.0, 0.0, 0.0, 0)


def test_load_reference_canonicalises_and_skips_blank_and_comments(tmp_path):
    path = tmp_path / "ref.txt"
    path.write_text("# header\nC\n\nOCC ethanol\nC1=CC=CC=C1\nC[C@@H](O)CC\n")
    assert load_reference_smiles(path) == frozenset({"C", "CCO", "c1ccccc1", "CC[C@@H](C)O"})
    assert "CCC(C)O" in load_reference_smiles(path, isomeric=False)
    assert "OCC" in load_reference_smiles(path, canonicalize=False)


def test_load_reference_names_file_and_line(tmp_path, capfd):
    path = tmp_path / "bad.txt"
    path.write_text("C\nCC\nC1CC\nO\n")  # line 3: unclosed ring
    with pytest.raises(ValueError, match=rf"{path}:3: cannot parse SMILES 'C1CC'"):
        load_reference_smiles(path)
    assert capfd.readouterr().err == ""  # RDKit's own parse error is silenced
