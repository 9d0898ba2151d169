"""The conformer dataset build (scripts/build_molgen_data.py, molgen_grpo.conformers) on a few small
molecules in tmp: seeded ensembles, pruning, the cap, stereo, failures as statuses, the 3DMolGen layout
(JSONL that decodes to its SMILES, reference pickles through the restricted unpickler, relative mapping)."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from rdkit import Chem

from molgen_grpo.conformers import (ENERGY_PROP, MAPPING_NAME, EnsembleSettings, build_ensemble, embed_seed,
                                    heavy_rmsd, jsonl_records, split_molecules, write_dataset)
from molgen_grpo.pickles import load_pickle
from molgen_grpo.text import decode, same_graph, strip_smiles

REPO = Path(__file__).resolve().parents[2]
FAST = EnsembleSettings(num_embed=12, max_attempts=10, prune_rms=0.5, max_confs=30)


def load_script():
    spec = importlib.util.spec_from_file_location("build_molgen_data", REPO / "scripts" / "build_molgen_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coordinates(mol: Chem.Mol) -> list[tuple[float, ...]]:
    return [tuple(round(v, 6) for v in p) for p in mol.GetConformer().GetPositions()]


def test_ensemble_is_relaxed_pruned_sorted_and_reproducible():
    ensemble = build_ensemble("CCCCCO", line=7, seed=3, settings=FAST)
    assert ensemble.status == "kept" and 2 <= len(ensemble.conformers) <= FAST.num_embed
    assert ensemble.embedded == FAST.num_embed
    energies = ensemble.energies
    assert energies == sorted(energies)
    for a, b in itertools.combinations(ensemble.conformers, 2):
        assert heavy_rmsd(a, b) >= FAST.prune_rms
    for mol in ensemble.conformers:  # hydrogens explicit, one conformer, provenance kept
        assert mol.GetNumConformers() == 1 and mol.GetNumAtoms() > Chem.RemoveHs(mol).GetNumAtoms()
        assert mol.GetIntProp("source_line") == 7 and mol.HasProp(ENERGY_PROP)
    again = build_ensemble("CCCCCO", line=7, seed=3, settings=FAST)
    assert [coordinates(m) for m in again.conformers] == [coordinates(m) for m in ensemble.conformers]
    other = build_ensemble("CCCCCO", line=7, seed=4, settings=FAST)
    assert coordinates(other.conformers[-1]) != coordinates(ensemble.conformers[-1])


def test_the_cap_keeps_the_lowest_energy_conformers():
    full = build_ensemble("CCCCCO", line=1, seed=0, settings=FAST)
    capped = build_ensemble("CCCCCO", line=1, seed=0, settings=EnsembleSettings(12, 10, 0.5, max_confs=2))
    assert len(full.conformers) > 2 and len(capped.conformers) == 2
    assert capped.energies == full.energies[:2]
    default = build_ensemble("CCCCCCO", line=1, seed=0)  # 50 embeddings, the shipped settings
    assert 1 <= len(default.conformers) <= 30


def test_a_stricter_threshold_keeps_fewer():
    loose = build_ensemble("CCCCCO", line=1, seed=0, settings=EnsembleSettings(12, 10, 0.1, 30))
    strict = build_ensemble("CCCCCO", line=1, seed=0, settings=EnsembleSettings(12, 10, 1.0, 30))
    assert len(strict.conformers) < len(loose.conformers)
    for a, b in itertools.combinations(strict.conformers, 2):
        assert heavy_rmsd(a, b) >= 1.0


def test_embed_seed_is_never_zero():
    assert all(embed_seed(seed, line) >= 1 for seed in (0, 1, 7) for line in range(1, 50))
    wrap = 2**31 - 2  # the line at which the residue is 0 still gives seed 1
    assert embed_seed(0, wrap) == 1 and embed_seed(0, 1) == 2


def test_unassigned_stereo_gets_one_isomer_for_every_conformer():
    ensemble = build_ensemble("C#CC(=NO)C(C)(C)C", line=2, seed=0, settings=FAST)  # oxime E/Z left open
    assert ensemble.status == "kept" and ensemble.stereo_fixed
    assert "/" in ensemble.smiles or "\\" in ensemble.smiles
    for record in jsonl_records(ensemble):
        assert record["canonical_smiles"] == ensemble.smiles
        mol = decode(record["embedded_smiles"])
        Chem.AssignStereochemistryFrom3D(mol)
        assert Chem.MolToSmiles(mol) == ensemble.smiles  # the geometry has the stereo the text states


def test_failures_are_statuses_not_exceptions():
    assert build_ensemble("not a smiles", line=1, seed=0, settings=FAST).status == "unparsable"
    with pytest.raises(ValueError, match="max_confs"):
        EnsembleSettings(max_confs=0)


def test_split_is_seeded_disjoint_and_complete():
    splits = split_molecules(50, seed=5)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [40, 5, 5]
    assert sorted(sum(splits.values(), [])) == list(range(50))
    assert split_molecules(50, seed=5) == splits and split_molecules(50, seed=6) != splits


def test_write_dataset_refuses_a_molecule_in_two_splits(tmp_path):
    kept = [build_ensemble("CCO", line=1, seed=0, settings=FAST)]
    with pytest.raises(ValueError, match="more than one split"):
        write_dataset(tmp_path, kept, {"train": [0], "valid": [0], "test": []})


def test_script_writes_3dmolgen_layout(tmp_path):
    source = tmp_path / "smiles.txt"
    source.write_text("CCO\nOCC\nCC(=O)OC\nc1ccncc1O\n")  # line 2 is line 1's molecule
    out = tmp_path / "data"
    script = load_script()
    code = script.main(["--smiles", str(source), "--num-molecules", "4", "--seed", "1", "--num-embed", "10",
                        "--reference-splits", "train", "valid", "test", "--out", str(out)])
    assert code == 0
    readme = (out / "README.md").read_text()
    assert "scripts/build_molgen_data.py" in readme and "`duplicate`: line 2 `OCC` (line 1)" in readme
    mapping = json.loads((out / MAPPING_NAME).read_text())
    seen: dict[str, str] = {}
    for split in ("train", "valid", "test"):
        rows = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        for row in rows:
            assert set(row) == {"canonical_smiles", "embedded_smiles"}
            assert strip_smiles(row["embedded_smiles"]) == row["canonical_smiles"]
            assert same_graph(Chem.MolToSmiles(decode(row["embedded_smiles"])), row["canonical_smiles"])
            assert seen.setdefault(row["canonical_smiles"], split) == split, "a molecule in two splits"
        for smiles in {r["canonical_smiles"] for r in rows}:
            path = out / mapping[smiles]
            assert not Path(mapping[smiles]).is_absolute() and path.is_file()
            refs = load_pickle(path)
            texts = [r["embedded_smiles"] for r in rows if r["canonical_smiles"] == smiles]
            assert isinstance(refs, list) and len(refs) == len(texts) <= 30
            for ref, text in zip(refs, texts):  # the pickle and the text are the same geometry
                assert ref.HasProp(ENERGY_PROP)
                assert heavy_rmsd(ref, decode(text)) < 1e-3
    assert len(seen) == 3 and set(mapping) == set(seen)
