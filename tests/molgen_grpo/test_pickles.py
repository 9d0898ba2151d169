"""Restricted unpickler: RDKit molecules, containers and numpy arrays load; any other global is refused."""

from __future__ import annotations

import io
import os
import pickle
import pickletools

import numpy as np
import pytest

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from elign.engine.errors import DataFormatError  # noqa: E402
from molgen_grpo.pickles import ALLOWED_GLOBALS, ForbiddenGlobalError, load_npy, load_pickle  # noqa: E402


@pytest.fixture
def all_props_pickled():
    """RDKit pickles molecule properties only when asked to; restore the process-wide default after."""
    before = Chem.GetDefaultPickleProperties()
    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    yield
    Chem.SetDefaultPickleProperties(before)


def conformer_mol() -> Chem.Mol:
    """Acetic acid with explicit H, two seeded ETKDG conformers and properties on molecule and conformer."""
    mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)O"))
    assert len(AllChem.EmbedMultipleConfs(mol, 2, randomSeed=7)) == 2
    mol.SetProp("_Name", "acetic acid")
    mol.SetDoubleProp("totalenergy", -12.5)
    mol.GetConformer(0).SetDoubleProp("boltzmannweight", 0.75)
    return mol


def pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) globals a pickle references, read from its opcodes."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        elif op.name in ("GLOBAL", "INST"):
            found.add(tuple(arg.split(" ", 1)))
    return found


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_rdkit_mol_with_conformers_and_props_round_trips(tmp_path, all_props_pickled, protocol):
    mol = conformer_mol()
    record = {"conformers": [{"rd_mol": mol, "boltzmannweight": 0.75, "totalenergy": np.float64(-12.5)}],
              "smiles": "CC(=O)O", "uniqueconfs": 1, "datasets": {"plpro", "aid1706"}}
    data = pickle.dumps(record, protocol=protocol)
    globals_used = pickled_globals(data)
    assert ("rdkit.Chem.rdchem", "Mol") in globals_used
    assert globals_used <= set(ALLOWED_GLOBALS), globals_used - set(ALLOWED_GLOBALS)
    loaded = load_pickle(write(tmp_path, "mol.pickle", data))
    assert loaded["smiles"] == "CC(=O)O" and loaded["uniqueconfs"] == 1
    assert loaded["datasets"] == {"plpro", "aid1706"}
    assert loaded["conformers"][0]["totalenergy"] == -12.5
    got = loaded["conformers"][0]["rd_mol"]
    assert isinstance(got, Chem.Mol)
    assert Chem.MolToSmiles(got) == Chem.MolToSmiles(mol) and got.GetNumAtoms() == 8
    assert got.GetNumConformers() == 2
    for k in range(2):  # RDKit pickles coordinates as float32 unless CoordsAsDouble is set
        expected = mol.GetConformer(k).GetPositions().astype(np.float32).astype(np.float64)
        np.testing.assert_array_equal(got.GetConformer(k).GetPositions(), expected)
    assert got.GetProp("_Name") == "acetic acid" and got.GetDoubleProp("totalenergy") == -12.5


def test_protocol_2_uses_only_allowed_python2_names():
    data = pickle.dumps({"s": {1, 2}, "b": b"\x00\xff"}, protocol=2)
    assert pickled_globals(data) == {("__builtin__", "set"), ("_codecs", "encode")}


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_os_system_is_refused_and_not_called(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.pickle", pickle.dumps({"conformers": [_Exploit(str(marker))]}))
    with pytest.raises(ForbiddenGlobalError) as info:
        load_pickle(path)
    assert info.value.global_name == f"{os.system.__module__}.system"  # posix.system on Linux
    assert path in str(info.value) and info.value.global_name in str(info.value)
    assert not marker.exists()


def test_protocol_0_global_is_refused_by_its_written_name(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil0.pickle", f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(ForbiddenGlobalError, match=r"evil0\.pickle: refused to load global 'os\.system'"):
        load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "numpy.load", "pickle.loads", "copyreg._reconstructor",
                                    "rdkit.Chem.rdmolfiles.MolFromSmiles", "rdkit.Chem.rdchem.Atom"])
def test_other_callables_are_refused(tmp_path, target):
    module, name = target.rsplit(".", 1)
    data = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL, then call it with '1'
    with pytest.raises(ForbiddenGlobalError) as info:
        load_pickle(write(tmp_path, "x.pickle", data))
    assert info.value.global_name == target


def test_persistent_ids_and_garbage_are_format_errors(tmp_path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "secret" else None

    buffer = io.BytesIO()
    Pickler(buffer).dump(["secret"])
    with pytest.raises(DataFormatError, match="persistent references"):
        load_pickle(write(tmp_path, "pid.pickle", buffer.getvalue()))
    with pytest.raises(DataFormatError, match=r"junk\.pickle: not a readable pickle"):
        load_pickle(write(tmp_path, "junk.pickle", b"not a pickle at all"))


# -- .npy -----------------------------------------------------------------------------------------------


def test_numeric_npy_loads_without_pickle(tmp_path):
    path = tmp_path / "plain.npy"
    np.save(path, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(load_npy(path), np.arange(12).reshape(3, 4))


def test_object_npy_of_index_arrays_loads(tmp_path):
    table = np.empty(3, dtype=object)
    table[:] = [np.array([5, 1, 3]), np.array([0]), np.array([2, 4], dtype=np.int32)]
    path = tmp_path / "split.npy"
    np.save(path, table, allow_pickle=True)
    got = load_npy(path)
    assert got.dtype == object and got.shape == (3,)
    for a, b in zip(got, table):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_object_npy_with_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": (3,)})
    buffer.write(pickle.dumps(_Exploit(str(marker)), protocol=3))
    path = write(tmp_path, "evil.npy", buffer.getvalue())
    with pytest.raises(ForbiddenGlobalError, match=r"evil\.npy: refused to load global '(posix|os)\.system'"):
        load_npy(path)
    assert not marker.exists()


def test_npy_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"notnpy\.npy: not a readable \.npy file"):
        load_npy(write(tmp_path, "notnpy.npy", b"PK\x03\x04 a zip, not an array"))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": (3,)})
    buffer.write(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataFormatError, match=r"shape \(3,\), pickle holds list"):
        load_npy(write(tmp_path, "list.npy", buffer.getvalue()))
