"""Boltz's processed RCSB layout (v1 npz + records + MSAs + symmetry.pkl) read into featurizable targets.

Each test writes its own small dataset in exactly the upstream layout: a v1 ``Structure`` built from 1crn
(parsed by boltz's PDB parser), a record, a manifest and an MSA made by boltz's own a3m parser.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("boltz")
from boltz.data import const  # noqa: E402
from boltz.data.parse.a3m import parse_a3m  # noqa: E402
from boltz.data.types import Atom, Bond, Chain, Connection, Interface, Structure  # noqa: E402

from boltz_ft.data import featurize  # noqa: E402
from boltz_ft.rcsb import (RCSBTargets, RefusedGlobal, load_symmetry, load_v1_structure,  # noqa: E402
                           symmetry_permutations)
from elign.engine.errors import DataFormatError  # noqa: E402

CRAMBIN = "TTCCPSIVARSNFNVCRLPGTPEAICATYTGCIIIPGATCPGDYAN"
# Query + 2 rows; the last has a 2-residue insertion (lower case) after its 10th residue -> deletion 2 there.
A3M = f">query\n{CRAMBIN}\n>hit1\n{'A' + CRAMBIN[1:]}\n>hit2\n{CRAMBIN[:10]}aa{CRAMBIN[10:-1]}G\n"


def _featurize(target, ccd, seed: int, **kwargs) -> dict:
    """``featurize`` with torch's global RNG seeded too: boltz rotates the reference conformers (``ref_pos``)
    with ``torch.randn``, which ``featurize``'s ``seed`` does not reach."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return featurize(target, ccd, seed=seed, **kwargs)


def _codes(name: str) -> tuple[int, ...]:
    codes = [ord(c) - 32 for c in name]
    return tuple(codes + [0] * (4 - len(codes)))


def v1_from_v2(s2, mols) -> Structure:
    """A v1 ``Structure`` as boltz's v1 processing writes it: element/charge/chirality and the reference
    conformer from the CCD entry, names as 4 int8 codes; intra-residue bonds -> ``bonds``, the rest ->
    ``connections``."""
    atoms = np.zeros(len(s2.atoms), dtype=Atom)
    for res in s2.residues:
        mol = mols.get(str(res["name"]))
        ref = {a.GetProp("name"): a for a in mol.GetAtoms()}
        ideal = mol.GetConformer().GetPositions()
        for k in range(res["atom_idx"], res["atom_idx"] + res["atom_num"]):
            atom = s2.atoms[k]
            r = ref[str(atom["name"])]
            atoms[k] = (_codes(str(atom["name"])), r.GetAtomicNum(), r.GetFormalCharge(), atom["coords"],
                        ideal[r.GetIdx()], atom["is_present"], const.chirality_type_ids[str(r.GetChiralTag())])
    same = s2.bonds["res_1"] == s2.bonds["res_2"]
    bonds = np.array([(b["atom_1"], b["atom_2"], b["type"]) for b in s2.bonds[same]], dtype=Bond)
    connections = np.array([tuple(b[k] for k in ("chain_1", "chain_2", "res_1", "res_2", "atom_1", "atom_2"))
                            for b in s2.bonds[~same]], dtype=Connection)
    return Structure(atoms=atoms, bonds=bonds, residues=s2.residues.copy(), chains=s2.chains.copy(),
                     connections=connections, interfaces=s2.interfaces.astype(Interface), mask=s2.mask.copy())


def two_chains(v1: Structure) -> Structure:
    """Chain "X" (a copy of 1crn, to be dropped) before 1crn; a disulfide in 1crn, a link across the two."""
    n_atoms, n_res = len(v1.atoms), len(v1.residues)
    residues = np.concatenate([v1.residues, v1.residues])
    for column in ("atom_idx", "atom_center", "atom_disto"):
        residues[column][n_res:] += n_atoms
    chains = np.concatenate([v1.chains, v1.chains])
    chains[0]["name"] = "X"
    chains[1]["asym_id"], chains[1]["sym_id"], chains[1]["atom_idx"], chains[1]["res_idx"] = 1, 1, n_atoms, n_res
    sg = [int(np.flatnonzero(v1.atoms["name"][:, 0] == ord("S") - 32)[0])]  # SG of Cys3 (first sulfur)
    sg.append(int(np.flatnonzero(v1.atoms["name"][:, 0] == ord("S") - 32)[-1]))
    res_of = np.repeat(np.arange(n_res), v1.residues["atom_num"])
    connections = np.array([(1, 1, n_res + res_of[sg[0]], n_res + res_of[sg[1]], n_atoms + sg[0], n_atoms + sg[1]),
                            (0, 1, res_of[sg[0]], n_res + res_of[sg[0]], sg[0], n_atoms + sg[0])], dtype=Connection)
    return Structure(atoms=np.concatenate([v1.atoms, v1.atoms]), bonds=v1.bonds, residues=residues, chains=chains,
                     connections=connections, interfaces=np.array([(0, 1)], dtype=Interface),
                     mask=np.array([False, True]))


def record_dict(target, structure: Structure, msa_ids: dict[int, object], valid: dict[int, bool] | None = None):
    info = asdict(target.input.record.structure)
    chains = [{"chain_id": int(c["asym_id"]), "chain_name": str(c["name"]), "mol_type": int(c["mol_type"]),
               "cluster_id": 7, "msa_id": msa_ids.get(int(c["asym_id"]), ""), "num_residues": int(c["res_num"]),
               "valid": (valid or {}).get(int(c["asym_id"]), True), "entity_id": int(c["entity_id"])}
              for c in structure.chains]
    interfaces = [{"chain_1": int(i["chain_1"]), "chain_2": int(i["chain_2"]), "valid": True}
                  for i in structure.interfaces]
    return {"id": target.id, "structure": info, "chains": chains, "interfaces": interfaces}


def write_dataset(root: Path, structure: Structure, record: dict, *, manifest: str = "list", with_msa: bool = True,
                  drop_cyclic: bool = False) -> Path:
    """``root/targets/{manifest.json,records/,structures/}`` and ``root/msa/`` as boltz's processing writes them."""
    (root / "targets" / "records").mkdir(parents=True)
    (root / "targets" / "structures").mkdir()
    (root / "msa").mkdir()
    tables = asdict(structure)
    if drop_cyclic:
        names = [n for n in tables["chains"].dtype.names if n != "cyclic_period"]
        tables["chains"] = np.array(tables["chains"][names].tolist(), dtype=[d for d in Chain if d[0] in names])
    np.savez_compressed(root / "targets" / "structures" / f"{record['id']}.npz", **tables)
    (root / "targets" / "records" / f"{record['id']}.json").write_text(json.dumps(record))
    if manifest is not None:
        data = [record] if manifest == "list" else {"records": [record]}
        (root / "targets" / "manifest.json").write_text(json.dumps(data, indent=1))
    if with_msa:
        a3m = root / "crambin.a3m"
        a3m.write_text(A3M)
        parse_a3m(a3m, taxonomy=None).dump(root / "msa" / "crn_msa.npz")
    return root


@pytest.fixture
def crambin_v1(crambin, ccd) -> Structure:
    return v1_from_v2(crambin.input.structure, ccd)


@pytest.fixture
def dataset(tmp_path, crambin, crambin_v1) -> Path:
    return write_dataset(tmp_path / "rcsb", crambin_v1, record_dict(crambin, crambin_v1, {0: "crn_msa"}))


def test_rcsb_target_featurizes_like_the_pdb_file(tmp_path, crambin, crambin_v1, ccd):
    root = write_dataset(tmp_path / "rcsb", crambin_v1, record_dict(crambin, crambin_v1, {0: -1}), with_msa=False)
    targets = RCSBTargets(root, mols=ccd)
    assert len(targets) == 1 and targets.ids == ["1crn"]
    target = targets.load("1crn")
    assert target.source == "rcsb" and target.sequences == {"A1": CRAMBIN} and target.input.msa == {}
    s1, s2 = target.input.structure, crambin.input.structure
    assert (s1.atoms["name"] == s2.atoms["name"]).all() and (s1.atoms["element"] == s2.atoms["element"]).all()
    np.testing.assert_array_equal(s1.coords["coords"], s2.coords["coords"])
    assert (s1.residues == s2.residues).all() and (s1.chains == s2.chains).all()
    ours, theirs = (_featurize(t, ccd, seed=3, max_tokens=24) for t in (target, crambin))
    assert ours.keys() == theirs.keys()
    for key in ours:  # v1 has no B-factors: the only difference
        if torch.is_tensor(ours[key]) and key != "bfactor":
            assert torch.equal(ours[key], theirs[key]), key
    assert ours["res_type"].shape[0] == 24 and ours["coords"].abs().sum() > 0


def test_msa_rows_and_deletions_reach_the_features(dataset, crambin, ccd):
    target = RCSBTargets(dataset, mols=ccd).load("1crn")
    assert set(target.input.msa) == {0} and len(target.input.msa[0].sequences) == 3
    ours, theirs = _featurize(target, ccd, seed=0), _featurize(crambin, ccd, seed=0)
    torch.testing.assert_close(ours["coords"], theirs["coords"], rtol=0, atol=0)
    assert ours["msa"].shape == (3, len(CRAMBIN)) and theirs["msa"].shape[0] == 1
    assert (ours["msa"][0] == ours["res_type"].argmax(-1)).all()
    assert ours["msa"][1, 0] == const.token_ids["ALA"]
    # The 2-residue insertion after residue 10 is a deletion of 2 on residue 11 (index 10) of row 2 only.
    assert ours["has_deletion"].nonzero().tolist() == [[2, 10]]
    assert float(ours["deletion_value"][2, 10]) > 0


def test_both_manifest_forms_and_records_dir_without_a_manifest(tmp_path, crambin, crambin_v1, ccd):
    record = record_dict(crambin, crambin_v1, {0: "crn_msa"})
    for form in ("list", "dict", None):
        root = write_dataset(tmp_path / f"m_{form}", crambin_v1, record, manifest=form)
        targets = RCSBTargets(root, mols=ccd)
        assert targets.ids == ["1crn"] and targets.records["1crn"].chains[0].cluster_id == 7
    assert len(RCSBTargets(root, ids=[], mols=ccd)) == 0 and len(RCSBTargets(root, max_targets=0, mols=ccd)) == 0
    with pytest.raises(DataFormatError, match="'2abc'"):
        RCSBTargets(root, ids=["2abc"], mols=ccd)


def test_missing_files_and_bad_json_name_the_file_and_record(dataset, ccd):
    (dataset / "targets" / "structures" / "1crn.npz").rename(dataset / "elsewhere.npz")
    with pytest.raises(DataFormatError, match=r"structures/1crn\.npz: no structure file \(record 1crn\)"):
        RCSBTargets(dataset, mols=ccd).load("1crn")
    (dataset / "elsewhere.npz").rename(dataset / "targets" / "structures" / "1crn.npz")
    (dataset / "msa" / "crn_msa.npz").unlink()
    with pytest.raises(DataFormatError, match=r"msa/crn_msa\.npz: no MSA file \(record 1crn\)") as err:
        RCSBTargets(dataset, mols=ccd).load("1crn")
    assert err.value.path == str(dataset / "msa" / "crn_msa.npz")
    manifest = dataset / "targets" / "manifest.json"
    manifest.write_text('[\n {"id": "1crn",\n  "structure": {}, oops\n]')
    with pytest.raises(DataFormatError, match="bad JSON") as err:
        RCSBTargets(dataset, mols=ccd)
    assert err.value.path == str(manifest) and err.value.line == 3
    manifest.write_text(json.dumps([{"id": "9bad", "chains": []}]))
    with pytest.raises(DataFormatError, match="record '9bad' is not a boltz Record"):
        RCSBTargets(dataset, mols=ccd)
    manifest.unlink()
    (dataset / "targets" / "records").rename(dataset / "records_gone")
    with pytest.raises(DataFormatError, match="manifest.json: no manifest file"):
        RCSBTargets(dataset, mols=ccd)


def test_v1_file_without_cyclic_period(tmp_path, crambin, crambin_v1, ccd):
    root = write_dataset(tmp_path / "old", crambin_v1, record_dict(crambin, crambin_v1, {}), drop_cyclic=True)
    with np.load(root / "targets" / "structures" / "1crn.npz") as raw:
        assert "cyclic_period" not in raw["chains"].dtype.names
    assert load_v1_structure(root / "targets" / "structures" / "1crn.npz").chains["cyclic_period"].tolist() == [0]
    target = RCSBTargets(root, mols=ccd).load("1crn")
    assert target.input.structure.chains["cyclic_period"].tolist() == [0]
    assert featurize(target, ccd, seed=0, max_tokens=24)["cyclic_period"].eq(0).all()


def test_masked_and_invalid_chains_are_dropped_and_the_rest_renumbered(tmp_path, crambin, crambin_v1, ccd):
    two = two_chains(crambin_v1)
    root = write_dataset(tmp_path / "two", two, record_dict(crambin, two, {0: "crn_msa", 1: "crn_msa"}))
    targets = RCSBTargets(root, mols=ccd)
    target = targets.load("1crn")
    assert targets.dropped["1crn"] == {"X": "structure mask"}
    s = target.input.structure
    assert s.chains["name"].tolist() == ["A1"] and s.chains["asym_id"].tolist() == [0]
    assert s.chains["sym_id"].tolist() == [0] and len(s.atoms) == len(crambin_v1.atoms)
    assert set(target.input.msa) == {0} and [c.chain_id for c in target.input.record.chains] == [0]
    assert target.input.record.interfaces == [] and len(s.interfaces) == 0
    # The disulfide survives with chain/residue/atom indices of the new tables; the cross-chain link does not.
    (bond,) = s.bonds.tolist()
    assert bond[:2] == (0, 0) and bond[-1] == const.bond_type_ids["COVALENT"]
    assert s.residues["name"][bond[2]] == s.residues["name"][bond[3]] == "CYS"
    assert s.atoms["name"][bond[4]] == s.atoms["name"][bond[5]] == "SG"
    feats = featurize(target, ccd, seed=0)
    assert feats["token_bonds"].sum() == 2  # symmetric

    mask = np.array([True, True])
    valid = {1: False}
    two = Structure(**{**asdict(two), "mask": mask})
    root = write_dataset(tmp_path / "invalid", two, record_dict(crambin, two, {0: "crn_msa"}, valid=valid))
    targets = RCSBTargets(root, mols=ccd)
    target = targets.load("1crn")
    assert targets.dropped["1crn"] == {"A1": "record valid=False"}
    assert target.input.structure.chains["name"].tolist() == ["X"] and set(target.input.msa) == {0}
    assert len(target.input.structure.bonds) == 0


def test_chain_with_a_residue_unknown_to_the_ccd_is_dropped(tmp_path, crambin, crambin_v1, ccd):
    two = two_chains(crambin_v1)
    two = Structure(**{**asdict(two), "mask": np.array([True, True])})
    two.residues["name"][3] = "ZZZZ"
    root = write_dataset(tmp_path / "unk", two, record_dict(crambin, two, {}))
    targets = RCSBTargets(root, mols=ccd)
    assert targets.load("1crn").input.structure.chains["name"].tolist() == ["A1"]
    assert targets.dropped["1crn"] == {"X": "residue ZZZZ is not in the CCD"}
    two.residues["name"][:] = "ZZZZ"  # every chain gone
    root = write_dataset(tmp_path / "none", two, record_dict(crambin, two, {}))
    with pytest.raises(DataFormatError, match="record 1crn: no chain left"):
        RCSBTargets(root, mols=ccd).load("1crn")


def _symmetry_mols():
    from rdkit import Chem

    mols = {}
    for code, smiles in {"EOH": "CCO", "ACY": "CC(=O)O"}.items():
        mol = Chem.MolFromSmiles(smiles)
        for atom in mol.GetAtoms():
            atom.SetProp("name", f"{atom.GetSymbol()}{atom.GetIdx() + 1}")
        perms = [list(range(mol.GetNumAtoms()))]
        mol.SetProp("symmetries", pickle.dumps(perms).hex())
        mols[code] = mol
    return mols


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_symmetry_pickle_of_rdkit_mols_loads(tmp_path, protocol):
    from rdkit import Chem

    previous = Chem.GetDefaultPickleProperties()
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)  # what boltz's ccd.py sets
    try:
        data = {**_symmetry_mols(), "BAD": None}
        path = tmp_path / "symmetry.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    finally:
        Chem.SetDefaultPickleProperties(previous)
    loaded = load_symmetry(path)
    assert sorted(loaded) == ["ACY", "BAD", "EOH"] and loaded["BAD"] is None
    assert Chem.MolToSmiles(loaded["ACY"]) == "CC(=O)O"
    perms = symmetry_permutations(loaded)
    assert perms["EOH"] == ([[0, 1, 2]], [(35, 17, 0, 0), (35, 18, 0, 0), (47, 19, 0, 0)])


def test_dataset_symmetries_are_optional(dataset, ccd):
    targets = RCSBTargets(dataset, mols=ccd)
    assert targets.symmetries() == {}
    (dataset / "symmetry.pkl").write_bytes(pickle.dumps(_symmetry_mols()))
    assert sorted(targets.symmetries()) == ["ACY", "EOH"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_symmetry_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "symmetry.pkl"
    path.write_bytes(pickle.dumps({"EOH": _Evil(marker)}))
    with pytest.raises(RefusedGlobal, match=rf"{os.system.__module__}\.system is not allowed") as err:
        load_symmetry(path)
    assert isinstance(err.value, pickle.UnpicklingError) and str(path) in str(err.value)
    assert not marker.exists()
    # The inner permutations pickle allows no globals at all.
    mol = _symmetry_mols()["EOH"]
    mol.SetProp("symmetries", pickle.dumps(_Evil(marker)).hex())
    with pytest.raises(pickle.UnpicklingError, match="symmetries of EOH"):
        symmetry_permutations({"EOH": mol})
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print"):
        load_symmetry(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="not a readable pickle"):
        load_symmetry(path)
    path.write_bytes(pickle.dumps(["EOH"]))
    with pytest.raises(DataFormatError, match="expected a dict"):
        load_symmetry(path)
    with pytest.raises(DataFormatError, match="no symmetry file"):
        load_symmetry(tmp_path / "absent.pkl")
