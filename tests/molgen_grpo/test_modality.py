"""Modality of a completion: tags first (earliest wins, <amino_acid> = <protein>), metadata, then a detector with
lobster's precedence tested on its known misclassifications."""

import pytest

from molgen_grpo.modality import Parsed, check_sequence, detect_modality, find_tagged, parse_completion


@pytest.mark.parametrize("text,expected,lobster", [
    ("CCC", "smiles", "dna"),          # propane: lobster's DNA rule fires first
    ("CCCC", "smiles", "dna"),
    ("CCN", "smiles", "protein"),      # ethylamine: lobster's protein rule fires first
    ("CCS", "smiles", "protein"),
    ("c1ccccc1", "smiles", "smiles"),  # lobster validates it upper-cased as C1CCCCC1; RDKit reads it as written here
    ("CC(=O)O", "smiles", "smiles"),
    ("ATGCATGCAA", "dna", "dna"),
    ("atgcatgcaa", "dna", "dna"),      # case-insensitive, as lobster
    ("MKTAYIAKQRQISFVKSHFSRQ", "protein", "protein"),
    ("  GATTACA \n", "dna", "dna"),    # whitespace stripped
    ("A" * 4000, "dna", "dna"),        # long input
])
def test_detector_known_cases(text, expected, lobster):
    assert detect_modality(text) == (expected, None), (text, lobster)


@pytest.mark.parametrize("text,reason", [
    ("AC", "too_short"), ("", "too_short"),
    ("C(C(C(C(C", "invalid_smiles"), ("C[Invalid]C", "invalid_smiles"),  # lobster: "failed validation"
    ("XYZ123", "unknown_modality"), ("ATGCXYZ", "unknown_modality"),    # lobster: ambiguous
])
def test_detector_failures_name_a_reason(text, reason):
    assert detect_modality(text) == (None, reason)


def test_earliest_complete_tag_wins_and_amino_acid_is_protein():
    assert find_tagged("x <dna>ACGT</dna> then <smiles>CCO</smiles>") == ("dna", "ACGT")
    assert find_tagged("<amino_acid>\n MKV \n</amino_acid>") == ("protein", "MKV")
    assert find_tagged("<SMILES>CCO</SMILES>") == ("smiles", "CCO")
    # An opening tag without its own closing tag does not count: the next complete pair does.
    assert find_tagged("<smiles>CCO <dna>ACGTT</dna>") == ("dna", "ACGTT")
    assert find_tagged("<protein>MKV</dna>") is None and find_tagged("plain text") is None


def test_sources_in_order_and_failures():
    assert parse_completion("<protein>MKV</protein>") == Parsed("MKV", "protein", "tags")
    assert parse_completion("<protein>  </protein>", metadata="protein") == Parsed("", None, "tags", "empty_tag")
    assert parse_completion("MKTAYIAK", sources=["tags"]) == Parsed("", None, None, "no_tag")
    assert parse_completion(" MKTAYIAK ", metadata="protein", sources=["tags", "metadata", "detect"]) == \
        Parsed("MKTAYIAK", "protein", "metadata")
    assert parse_completion("CCN", sources=["tags", "metadata", "detect"]) == Parsed("CCN", "smiles", "detect")
    assert parse_completion("XYZ123", sources=["detect"]) == Parsed("", None, "detect", "unknown_modality")
    with pytest.raises(ValueError, match="unknown modality source"):
        parse_completion("CCO", sources=["guess"])


@pytest.mark.parametrize("sequence, modality, reason", [
    ("CCO", "smiles", None), ("c1ccccc1", "smiles", None), ("C1CC", "smiles", "invalid_smiles"),
    ("CC(", "smiles", "invalid_smiles"), ("MKVacdefghiklnpqrstwy", "protein", None),
    ("MKVB", "protein", "invalid_protein"), ("MK V", "protein", "invalid_protein"), ("acgtACGT", "dna", None),
    ("ACGU", "dna", "invalid_dna"), ("", "dna", "invalid_dna"),
])
def test_check_sequence_per_modality(sequence, modality, reason):
    assert check_sequence(sequence, modality) == reason


def test_check_sequence_refuses_an_unknown_modality():
    with pytest.raises(ValueError, match="rna"):
        check_sequence("ACGU", "rna")
