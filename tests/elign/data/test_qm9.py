"""QM9 reader: a small archive written in the exact release format, EDM's split, errors, dataset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from elign.data import (
    PROPERTY_NAMES,
    QM9Dataset,
    collate_qm9,
    iter_qm9,
    load_qm9,
    node_count_histogram,
    qm9_split_indices,
    read_exclusion_list,
    read_qm9_xyz,
)
from elign.engine.errors import ConfigError, DataFormatError

Chem = pytest.importorskip("rdkit.Chem")
AllChem = pytest.importorskip("rdkit.Chem.AllChem")

SMILES = ["C", "N", "O", "C#C", "C#N", "C=O", "CC", "CO", "CC#C", "CC#N", "CC=O", "CF"]
SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
TINY = 1.2e-6  # written as "1.2*^-6", the release's Mathematica exponent


def _mathematica(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}*^{int(exponent)}"


def _molecule(index: int, smiles: str) -> dict:
    """Geometry from RDKit ETKDG and made-up (but realistically formatted) properties."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=index) == 0
    pos = mol.GetConformer().GetPositions()
    pos[0, 2] = TINY  # exercise the *^ exponent in a coordinate
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    rng = np.random.default_rng(index)
    props = dict(zip(PROPERTY_NAMES, rng.normal(size=15).round(6)))
    props["mu"] = 0.0
    props["zpve"] = 4.5e-5
    charges = rng.normal(scale=0.3, size=len(numbers)).round(6)
    return {"index": index, "smiles": smiles, "positions": pos, "numbers": numbers, "props": props,
            "charges": charges, "inchi": Chem.MolToInchi(Chem.MolFromSmiles(smiles))}


def _xyz_text(m: dict) -> str:
    n = len(m["numbers"])
    values = []
    for key in PROPERTY_NAMES:
        v = m["props"][key]
        values.append("0." if v == 0 else _mathematica(v) if key == "zpve" else repr(float(v)))
    lines = [str(n), f"gdb {m['index']}\t" + "\t".join(values) + "\t"]
    for z, (x, y, zc), q in zip(m["numbers"], m["positions"], m["charges"]):
        coords = [_mathematica(c) if abs(c) < 1e-4 and c != 0 else f"{c: .10f}" for c in (x, y, zc)]
        lines.append(f"{SYMBOL[int(z)]}\t" + "\t".join(coords) + f"\t{q: .6f}")
    lines.append("\t".join(f"{1000.0 + 37.5 * k:.4f}" for k in range(max(3 * n - 6, 1))))
    lines.append(f"{m['smiles']}\t{m['smiles']}\t")
    lines.append(f"{m['inchi']}\t{m['inchi']}")
    return "\n".join(lines) + "\n"


def _member(index: int) -> str:
    return f"dsgdb9nsd_{index:06d}.xyz"


def _write_tar(path: Path, texts: dict[str, str]) -> Path:
    with tarfile.open(path, "w:bz2") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def molecules() -> list[dict]:
    return [_molecule(i + 1, s) for i, s in enumerate(SMILES)]


@pytest.fixture()
def sources(tmp_path: Path, molecules: list[dict]) -> tuple[Path, Path]:
    texts = {_member(m["index"]): _xyz_text(m) for m in molecules}
    archive = _write_tar(tmp_path / "dsgdb9nsd.xyz.tar.bz2", texts)
    folder = tmp_path / "xyz"
    folder.mkdir()
    for name, text in texts.items():
        (folder / name).write_text(text)
    return archive, folder


def _check(parsed, expected: dict) -> None:
    assert parsed.index == expected["index"]
    np.testing.assert_array_equal(parsed.atomic_numbers, expected["numbers"])
    np.testing.assert_allclose(parsed.positions, expected["positions"], atol=1e-9, rtol=0)
    np.testing.assert_allclose(parsed.mulliken_charges, expected["charges"], atol=1e-6)
    for key in PROPERTY_NAMES:
        assert parsed.properties[key] == pytest.approx(expected["props"][key], abs=1e-6), key
    assert parsed.smiles == parsed.smiles_relaxed == expected["smiles"]
    assert parsed.inchi == expected["inchi"]


def test_read_archive_and_directory(sources: tuple[Path, Path], molecules: list[dict]) -> None:
    archive, folder = sources
    from_tar, from_dir = list(iter_qm9(archive)), list(iter_qm9(folder))
    assert len(from_tar) == len(from_dir) == len(SMILES)
    for a, b, expected in zip(from_tar, from_dir, molecules):
        _check(a, expected)
        _check(b, expected)
        assert a.positions[0, 2] == pytest.approx(TINY, rel=1e-12)  # the "*^" coordinate
        assert a.properties["zpve"] == pytest.approx(4.5e-5, rel=1e-12)
        assert _member(expected["index"]) in a.name
    # One file, from its text and from its path.
    _check(read_qm9_xyz(_xyz_text(molecules[3])), molecules[3])
    _check(read_qm9_xyz(folder / _member(4)), molecules[3])


def test_exclusion_list_is_applied(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    archive, _ = sources
    excl = tmp_path / "uncharacterized.txt"
    # Layout of the release file: text header lines, a column header, rows starting with the index, a footer.
    excl.write_text(
        " Uncharacterized molecules\n\n List of molecules which failed the consistency check\n\n\n\n"
        "   Index     SMILES (GDB-17)     SMILES (B3LYP)     dE\n  ----------------------\n"
        "       3    O    O    0.1\n       7    CC   C=C  0.2\n  ----------------------\n"
    )
    assert read_exclusion_list(excl) == [3, 7]
    kept = load_qm9(archive, exclude=excl)
    assert [m.index for m in kept] == [i for i in range(1, 13) if i not in (3, 7)]


def test_split_of_small_source_matches_split_function(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    archive, folder = sources
    excl = tmp_path / "uncharacterized.txt"
    excl.write_text("Index\n  5  CC\n  9  x\n")
    # 10 included molecules: test int(0.1 * 10) = 1, train 6, valid 3.
    splits = {s: load_qm9(archive, excl, s, seed=0, n_train=6, n_total=12) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [6, 3, 1]
    reference = qm9_split_indices(12, [4, 8], seed=0, n_train=6)
    for name, mols in splits.items():
        assert [m.index for m in mols] == sorted((reference[name] + 1).tolist())  # ascending index order
    union = sorted(m.index for mols in splits.values() for m in mols)
    assert union == [i for i in range(1, 13) if i not in (5, 9)]
    again = load_qm9(folder, excl, "train", seed=0, n_train=6, n_total=12)
    assert [m.index for m in again] == [m.index for m in splits["train"]]
    # A subset of the release cannot be split with the release's numbering.
    with pytest.raises(DataFormatError, match=r"1\.\.133885"), pytest.warns(UserWarning, match="3054"):
        load_qm9(archive, excl, "train")
    with pytest.raises(ConfigError, match="split"):
        load_qm9(archive, excl, "training")


def test_split_sizes_and_determinism_at_release_size() -> None:
    n_total = 133_885
    excluded = np.random.default_rng(123).choice(n_total, size=3054, replace=False)
    state = np.random.get_state()
    a = qm9_split_indices(n_total, excluded, seed=0)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is untouched
    assert {k: len(v) for k, v in a.items()} == {"train": 100_000, "valid": 17_748, "test": 13_083}
    b = qm9_split_indices(n_total, list(excluded), seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = qm9_split_indices(n_total, excluded, seed=1)
    assert not np.array_equal(a["train"], c["train"])
    everything = np.concatenate([a["train"], a["valid"], a["test"]])
    assert len(np.unique(everything)) == n_total - 3054
    assert not np.isin(everything, excluded).any()
    # Upstream's recipe, written independently: global seed, permutation of the included positions.
    included = np.array(sorted(set(range(n_total)) - set(excluded.tolist())))
    np.random.seed(0)
    perm = np.random.permutation(len(included))
    np.random.set_state(state)
    assert np.array_equal(a["train"], included[perm[:100_000]])
    assert np.array_equal(a["test"], included[perm[100_000 + 17_748:]])
    with pytest.raises(ConfigError, match="n_train"):
        qm9_split_indices(100, [], n_train=95)


@pytest.mark.parametrize(
    "edit, line, message",
    [
        (lambda lines: ["6"] + lines[1:], 1, "atom count 6"),
        (lambda lines: lines[:3] + ["H\t1.0x\t0.0\t0.0\t0.1"] + lines[4:], 4, "cannot parse x coordinate '1.0x'"),
        (lambda lines: lines[:4] + ["Xx\t0.0\t0.0\t1.0\t0.1"] + lines[5:], 5, "unknown element 'Xx'"),
        (lambda lines: lines[:1] + [lines[1].replace("gdb 1", "gdb 1\t2.5*^x")] + lines[2:], 2, "fields"),
    ],
    ids=["bad_count", "bad_float", "unknown_element", "bad_header"],
)
def test_malformed_member_names_file_and_line(tmp_path: Path, molecules: list[dict], edit, line: int,
                                               message: str) -> None:
    good = {_member(m["index"]): _xyz_text(m) for m in molecules[1:3]}
    bad_lines = edit(_xyz_text(molecules[0]).splitlines())  # methane: 5 atoms, lines 3..7
    texts = {_member(1): "\n".join(bad_lines) + "\n", **good}
    archive = _write_tar(tmp_path / "bad.tar.bz2", texts)
    with pytest.raises(DataFormatError) as err:
        list(iter_qm9(archive))
    text = str(err.value)
    assert f"[{_member(1)}]:{line}:" in text and message in text
    assert err.value.line == line


def test_node_count_histogram(sources: tuple[Path, Path], molecules: list[dict]) -> None:
    hist = node_count_histogram(iter_qm9(sources[0]))
    expected: dict[int, int] = {}
    for m in molecules:
        expected[len(m["numbers"])] = expected.get(len(m["numbers"]), 0) + 1
    assert hist == dict(sorted(expected.items()))
    assert list(hist) == sorted(hist) and sum(hist.values()) == len(SMILES)


def test_dataset_and_collate(sources: tuple[Path, Path], molecules: list[dict]) -> None:
    mols = load_qm9(sources[0])
    dataset = QM9Dataset(mols)
    item = dataset[6]  # ethane, 8 atoms
    assert item["positions"].shape == (8, 3) and item["node_mask"].all()
    assert torch.allclose(item["positions"].mean(0), torch.zeros(3), atol=1e-6)
    assert item["one_hot"].sum(0).tolist() == [6.0, 2.0, 0.0, 0.0, 0.0]
    assert item["charges"][:, 0].tolist() == molecules[6]["numbers"].tolist()

    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_qm9)))  # CH4 NH3 H2O C2H2
    assert batch["positions"].shape == (4, 5, 3) and batch["one_hot"].shape == (4, 5, 5)
    assert batch["charges"].shape == (4, 5, 1) and batch["node_mask"].dtype == torch.bool
    assert batch["node_mask"].sum(1).tolist() == [5, 4, 3, 4]
    pad = ~batch["node_mask"]
    assert batch["positions"][pad].abs().sum() == 0 and batch["one_hot"][pad].abs().sum() == 0
    assert batch["index"].tolist() == [1, 2, 3, 4]

    padded = QM9Dataset(mols, max_atoms=29)
    assert padded[0]["positions"].shape == (29, 3)
    trimmed = collate_qm9([padded[0], padded[2]])  # padding beyond the batch's largest molecule is cut
    assert trimmed["positions"].shape == (2, 5, 3)
    assert torch.equal(trimmed["positions"], collate_qm9([dataset[0], dataset[2]])["positions"])
    with pytest.raises(ConfigError, match="max_atoms"):
        QM9Dataset(mols, max_atoms=4)


def test_real_qm9_dataloader_config_reads_the_archive(sources: tuple[Path, Path]) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[3] / "conf/dataloader/edm/qm9.yaml")
    cfg.seed, cfg.batch_size, cfg.dataset.path, cfg.dataset.split = 0, 2, str(sources[0]), "all"
    batches = instantiate(cfg)
    batch = next(iter(batches))
    assert batch["positions"].shape[0] == 2 and batch["node_mask"].any()
    cfg.dataset.path = str(sources[0].with_name("missing.tar.bz2"))
    with pytest.raises(Exception, match="path"):
        instantiate(cfg)
