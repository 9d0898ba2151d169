"""boltz's parse -> tokenize -> crop -> featurize path offline: shapes, determinism, MSAs, errors."""

import pytest
import torch

from boltz_ft.data import featurize, load_structure, split_batch
from elign.engine.errors import DataFormatError

from conftest import PDB_DIR

CRAMBIN = "TTCCPSIVARSNFNVCRLPGTPEAICATYTGCIIIPGATCPGDYAN"


def test_whole_target_features_have_the_spec_shapes(crambin, ccd):
    feats = featurize(crambin, ccd, seed=0, training=False)
    tokens = len(CRAMBIN)
    assert crambin.sequences == {"A1": CRAMBIN} or list(crambin.sequences.values()) == [CRAMBIN]
    assert feats["res_type"].shape == (tokens, 33) and feats["token_bonds"].shape == (tokens, tokens, 1)
    atoms = feats["ref_pos"].shape[0]
    assert atoms % 32 == 0 and feats["atom_to_token"].shape == (atoms, tokens)
    assert feats["coords"].shape == (1, atoms, 3) and feats["disto_target"].shape == (tokens, tokens, 1, 64)
    assert feats["msa"].shape == (1, tokens)  # query-only MSA: one row, the sequence itself
    # 327 ATOM records; boltz keeps the residues' CCD heavy atoms minus leaving atoms (ASN 46's OXT): 326.
    assert int(feats["atom_resolved_mask"].sum()) == int(feats["atom_pad_mask"].sum()) == 326


def test_a_seed_fixes_the_crop_and_the_conformer_rotations(crambin, ccd):
    a, b = featurize(crambin, ccd, seed=5, max_tokens=24), featurize(crambin, ccd, seed=5, max_tokens=24)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = featurize(crambin, ccd, seed=6, max_tokens=24)
    assert not torch.equal(a["ref_pos"], c["ref_pos"])
    assert a["res_type"].shape[0] == 24 and int(a["token_pad_mask"].sum()) <= 24


def test_a3m_deletions_survive_the_pairing(tmp_path, ccd):
    """boltz's construct_paired_msa drops every deletion (it re-slices its own slice); ours keeps them."""
    path = tmp_path / "crn.a3m"
    # Row 1: 3 inserted residues (lower case) before residue 5; row 2: 2 before residue 10 and a gap at 20.
    path.write_text(f">q\n{CRAMBIN}\n>s1\n{CRAMBIN[:5]}aaa{CRAMBIN[5:]}\n"
                    f">s2\n{CRAMBIN[:10]}cc{CRAMBIN[10:20]}-{CRAMBIN[21:]}\n")
    target = load_structure(PDB_DIR / "1crn.pdb", ccd, a3m={"A1": path})
    feats = featurize(target, ccd, seed=0, training=False)
    assert feats["msa"].shape == (3, len(CRAMBIN))
    assert feats["has_deletion"].nonzero().tolist() == [[1, 5], [2, 10]]
    # boltz's deletion_value = (pi / 2) arctan(d / 3): 3 deletions -> pi^2 / 8 = 1.2337, 2 -> 0.9236.
    assert feats["deletion_value"][1, 5] == pytest.approx(1.2337, abs=1e-4)
    assert feats["deletion_value"][2, 10] == pytest.approx(0.9236, abs=1e-4)
    with pytest.raises(DataFormatError, match="chains are"):
        load_structure(PDB_DIR / "1crn.pdb", ccd, a3m={"B": path})


def test_split_batch_separates_truth_from_inputs(crambin_features):
    batch = split_batch(crambin_features, {"pdb_id": "1crn"})
    assert "coords" in batch["targets"] and "coords" not in batch["inputs"]
    assert "disto_target" in batch["targets"] and "res_type" in batch["inputs"]
    assert batch["inputs"]["res_type"].shape[0] == 1 and batch["meta"] == {"pdb_id": "1crn"}


def test_bad_files_are_named(tmp_path, ccd):
    with pytest.raises(FileNotFoundError, match="absent.pdb"):
        load_structure(tmp_path / "absent.pdb", ccd)
    bad = tmp_path / "x.xyz"
    bad.write_text("1\n\nC 0 0 0\n")
    with pytest.raises(DataFormatError, match="x.xyz"):
        load_structure(bad, ccd)
