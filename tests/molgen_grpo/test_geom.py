"""GEOM-Drugs reader: rdkit_folder pickles + torsional-diffusion split, written here in the real formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from elign.engine.errors import ConfigError, DataFormatError  # noqa: E402
from molgen_grpo.geom import iter_split, list_molecules, read_molecule, read_split  # noqa: E402
from molgen_grpo.pickles import ForbiddenGlobalError  # noqa: E402
from molgen_grpo.text import encode, same_graph  # noqa: E402

# GEOM names a file after its SMILES with "/" replaced by "_". Hand-sorted in Python string order
# ("(" < "." < "=" < "C" < "_" < "c"): the order split positions refer to.
MOLECULES = {  # file name -> (GEOM smiles, totalenergy per conformer; None = no energy in the file)
    "CC(=O)O.pickle": ("CC(=O)O", [-1.0, -3.0, None, -2.0, -3.0]),
    "CCO.pickle": ("CCO", [-5.0]),
    "C_C=C_C(=O)O.pickle": ("C/C=C/C(=O)O", [-4.0, -4.5]),
    "c1cc[nH]c1.pickle": ("c1cc[nH]c1", [-7.0, -6.0]),
    "c1ccccc1.pickle": ("c1ccccc1", [-8.0]),
}
SORTED_NAMES = ["CC(=O)O.pickle", "CCO.pickle", "C_C=C_C(=O)O.pickle", "c1cc[nH]c1.pickle", "c1ccccc1.pickle"]


def geom_record(smiles: str, energies: list[float | None], seed: int) -> dict:
    """A GEOM-shaped molecule dict: one explicit-H RDKit Mol with one conformer per entry."""
    template = Chem.AddHs(Chem.MolFromSmiles(smiles))
    # randomSeed=0 gives n identical conformers in RDKit: start at 1 so the order tests see distinct ones
    ids = list(AllChem.EmbedMultipleConfs(template, len(energies), randomSeed=seed + 1))
    assert len(ids) == len(energies)
    positions = [template.GetConformer(i).GetPositions() for i in ids]
    assert all(not np.allclose(positions[0], p) for p in positions[1:]), "conformers must differ"
    conformers = []
    for k, (conf_id, energy) in enumerate(zip(ids, energies)):
        mol = Chem.Mol(template, confId=conf_id)
        entry = {"geom_id": 1000 + k, "set": k + 1, "degeneracy": 1, "relativeenergy": 0.0,
                 "boltzmannweight": round(1.0 / (k + 1), 5), "conformerweights": [1.0], "rd_mol": mol}
        if energy is not None:
            entry["totalenergy"] = energy
        conformers.append(entry)
    return {"conformers": conformers, "smiles": smiles, "uniqueconfs": len(energies), "totalconfs": len(energies),
            "charge": 0, "temperature": 298.15, "datasets": ["plpro"]}


@pytest.fixture(scope="module")
def drugs(tmp_path_factory):
    """``rdkit_folder/drugs`` with the molecules above, pickled with protocol 3 as in GEOM."""
    folder = tmp_path_factory.mktemp("rdkit_folder") / "drugs"
    folder.mkdir()
    for seed, (name, (smiles, energies)) in enumerate(MOLECULES.items()):
        (folder / name).write_bytes(pickle.dumps(geom_record(smiles, energies, seed), protocol=3))
    (folder / ".hidden.pickle").write_bytes(b"ignored, like glob ignores it")
    (folder / "notes.txt").write_text("not a molecule")
    return folder


def save_split(path, train, val, test) -> None:
    """The torsional-diffusion split file: an object array of three index arrays."""
    table = np.empty(3, dtype=object)
    for position, indices in enumerate((train, val, test)):
        table[position] = np.asarray(indices, dtype=np.int64)
    np.save(path, table, allow_pickle=True)


def test_files_are_listed_in_upstream_glob_order(drugs):
    assert [p.name for p in list_molecules(drugs)] == SORTED_NAMES


def test_read_split_object_and_2d_forms(tmp_path):
    save_split(tmp_path / "split.npy", [4, 0, 2], [1], [3])
    assert read_split(tmp_path / "split.npy", "train").tolist() == [0, 2, 4]  # sorted, as upstream
    assert read_split(tmp_path / "split.npy", "val").tolist() == [1]
    assert read_split(tmp_path / "split.npy", "test").tolist() == [3]
    np.save(tmp_path / "square.npy", np.array([[2, 0], [1, 4], [3, 5]]))
    assert read_split(tmp_path / "square.npy", "val").tolist() == [1, 4]


def test_read_split_errors(tmp_path):
    save_split(tmp_path / "split.npy", [0], [1], [2])
    with pytest.raises(ConfigError, match="split='valid'"):
        read_split(tmp_path / "split.npy", "valid")
    np.save(tmp_path / "two.npy", np.array([[0, 1], [2, 3]]))
    with pytest.raises(DataFormatError, match=r"two\.npy: expected 3 index arrays"):
        read_split(tmp_path / "two.npy", "train")
    save_split(tmp_path / "neg.npy", [0, -1], [1], [2])
    with pytest.raises(DataFormatError, match="non-negative integers"):
        read_split(tmp_path / "neg.npy", "train")
    table = np.empty(3, dtype=object)
    table[:] = [np.array([0.5]), np.array([1, 2]), np.array([3, 4, 5])]
    np.save(tmp_path / "float.npy", table, allow_pickle=True)
    with pytest.raises(DataFormatError, match="dtype float64"):
        read_split(tmp_path / "float.npy", "train")


def test_iter_split_reads_the_indexed_molecules(drugs, tmp_path):
    save_split(tmp_path / "split.npy", [3, 0], [2], [1, 4])
    train = list(iter_split(drugs, tmp_path / "split.npy", "train", max_confs=30))
    assert [m.name for m in train] == ["CC(=O)O", "c1cc[nH]c1"]
    assert [m.smiles for m in train] == ["CC(=O)O", "c1cc[nH]c1"]
    assert [m.smiles for m in iter_split(drugs, tmp_path / "split.npy", "val")] == ["C/C=C/C(=O)O"]
    assert [m.smiles for m in iter_split(drugs, tmp_path / "split.npy", "test")] == ["CCO", "c1ccccc1"]
    pyrrole = train[1]
    assert pyrrole.energies == (-7.0, -6.0) and pyrrole.weights == (1.0, 0.5)
    for mol in pyrrole.conformers:  # GEOM's explicit-H Mols, usable by the text encoder as they are
        assert mol.GetNumConformers() == 1 and mol.GetNumAtoms() == 10
        smiles, enriched = encode(mol)
        assert same_graph(smiles, pyrrole.smiles) and "[nH]<" in enriched


def test_max_confs_keeps_lowest_energy_first(drugs):
    path = drugs / "CC(=O)O.pickle"
    everything = read_molecule(path, max_confs=30)
    assert everything.energies == (-3.0, -3.0, -2.0, -1.0, None)  # ties in file order, no energy last
    assert everything.weights == (0.5, 0.2, 0.25, 1.0, 0.33333)
    kept = read_molecule(path, max_confs=3)
    assert kept.energies == (-3.0, -3.0, -2.0)
    with open(path, "rb") as handle:
        raw = pickle.load(handle)["conformers"]  # our own test file: trusted
    for mol, source in zip(kept.conformers, [raw[1], raw[4], raw[3]]):
        np.testing.assert_array_equal(mol.GetConformer().GetPositions(),
                                      source["rd_mol"].GetConformer().GetPositions())
    with pytest.raises(ConfigError, match="max_confs=0"):
        read_molecule(path, max_confs=0)


def test_split_beyond_the_folder_is_refused_before_reading(drugs, tmp_path):
    save_split(tmp_path / "split.npy", [0, 5], [1], [2])
    with pytest.raises(DataFormatError, match="train position 5 is out of range for the 5 molecule files"):
        iter_split(drugs, tmp_path / "split.npy", "train")  # raised at the call, not at first next()
    with pytest.raises(DataFormatError, match="no \\*.pickle molecule files"):
        iter_split(tmp_path, tmp_path / "split.npy", "train")


def test_malformed_molecule_pickles(tmp_path):
    (tmp_path / "a.pickle").write_bytes(pickle.dumps({"conformers": []}))
    with pytest.raises(DataFormatError, match=r"a\.pickle: expected a GEOM molecule dict"):
        read_molecule(tmp_path / "a.pickle")
    record = geom_record("CCO", [-1.0, -2.0], seed=0)
    record["conformers"][1]["rd_mol"] = None
    (tmp_path / "b.pickle").write_bytes(pickle.dumps(record))
    with pytest.raises(DataFormatError, match=r"b\.pickle: conformer 1: expected a dict whose 'rd_mol'"):
        read_molecule(tmp_path / "b.pickle")
    record = geom_record("CCO", [-1.0], seed=0)
    record["conformers"][0]["totalenergy"] = "low"
    (tmp_path / "c.pickle").write_bytes(pickle.dumps(record))
    with pytest.raises(DataFormatError, match="conformer 0 'totalenergy' must be a finite number, got 'low'"):
        read_molecule(tmp_path / "c.pickle")


class _Exploit:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_malicious_molecule_pickle_names_global_and_file(tmp_path):
    (tmp_path / "CCO.pickle").write_bytes(pickle.dumps({"smiles": "CCO", "conformers": [_Exploit()]}))
    save_split(tmp_path / "split.npy", [0], [], [])
    molecules = iter_split(tmp_path, tmp_path / "split.npy", "train")
    with pytest.raises(ForbiddenGlobalError, match=r"CCO\.pickle: refused to load global 'builtins\.eval'"):
        next(molecules)
