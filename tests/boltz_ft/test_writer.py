"""PDB / mmCIF writers (boltz_ft.writer): write predicted coordinates, read them back with gemmi."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gemmi = pytest.importorskip("gemmi")

from boltz_ft.writer import chain_name, write_features, write_structure  # noqa: E402

THREE = {"A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "E": "GLU", "Q": "GLN", "G": "GLY", "H": "HIS",
         "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER", "T": "THR", "W": "TRP",
         "Y": "TYR", "V": "VAL"}


@pytest.fixture
def crambin_whole(crambin, ccd):
    """1crn featurized without a crop: the feature atom order is the structure's atom order."""
    from boltz_ft.data import featurize

    return featurize(crambin, ccd, seed=0)


def read_atoms(path) -> tuple[np.ndarray, list[tuple[int, str]], list[float]]:
    """Coordinates ``[A,3]``, (seq number, residue name) per residue and B-factors of the first model."""
    model = gemmi.read_structure(str(path))[0]
    xyz, residues, bfac = [], [], []
    for chain in model:
        for residue in chain:
            residues.append((residue.seqid.num, residue.name))
            for atom in residue:
                xyz.append(atom.pos.tolist())
                bfac.append(atom.b_iso)
    return np.array(xyz), residues, bfac


def predicted(feats: dict, seed: int = 0) -> torch.Tensor:
    """A fake prediction: the true coordinates moved and jittered (padding atoms left at 0)."""
    noise = 0.3 * torch.randn(feats["coords"].shape[1:], generator=torch.Generator().manual_seed(seed))
    return (feats["coords"][0] + noise + torch.tensor([4.0, -3.0, 2.0])) * feats["atom_pad_mask"][:, None]


@pytest.mark.parametrize("fmt", ["cif", "pdb"])
def test_write_features_round_trip_on_crop(crambin, crambin_features, tmp_path, fmt):
    f = crambin_features
    coords = predicted(f)
    plddt = torch.linspace(0.2, 0.9, f["asym_id"].shape[0])
    path = write_features(f, coords, tmp_path / f"crop.{fmt}", fmt=fmt, plddt=plddt)
    assert path.is_file() and path.stat().st_size > 0
    xyz, residues, bfac = read_atoms(path)
    real = f["atom_pad_mask"].bool()
    assert len(xyz) == int(real.sum())
    np.testing.assert_allclose(xyz, coords[real].numpy(), atol=1e-3)
    sequence = crambin.sequences["A1"]
    expected = [(int(i) + 1, THREE[sequence[int(i)]]) for i in f["residue_index"]]
    assert residues == expected
    tokens = f["atom_to_token"].argmax(-1)[real]
    np.testing.assert_allclose(bfac, 100 * plddt[tokens].numpy(), atol=0.01)


def test_write_features_atom_names_and_elements(crambin_features, tmp_path):
    f = crambin_features
    path = write_features({k: v.unsqueeze(0) for k, v in f.items()}, f["coords"][0], tmp_path / "batched.cif")
    model = gemmi.read_structure(str(path))[0]
    first = model[0][0]
    assert [a.name for a in first][:4] == ["N", "CA", "C", "O"]
    assert [a.element.name for a in first][:4] == ["N", "C", "C", "O"]
    assert model[0].name == chain_name(0) == "A"
    doc = gemmi.cif.read(str(path))
    assert set(doc[0].find_values("_atom_site.label_asym_id")) == {"A"}


def test_write_structure_with_boltz_writer(crambin, crambin_whole, tmp_path):
    f = crambin_whole
    coords = predicted(f, seed=1)
    real = f["atom_pad_mask"].bool()
    before = crambin.input.structure.atoms.copy()
    for fmt in ("cif", "pdb"):
        path = write_structure(crambin.input.structure, coords, f["atom_pad_mask"], tmp_path / f"whole.{fmt}",
                               fmt=fmt, plddt=torch.full((46,), 0.5))
        xyz, residues, bfac = read_atoms(path)
        assert len(xyz) == int(real.sum()) == 326
        np.testing.assert_allclose(xyz, coords[real].numpy(), atol=1e-3)
        assert "".join(gemmi.find_tabulated_residue(n).one_letter_code.upper() for _, n in residues) == \
            crambin.sequences["A1"]
        assert np.allclose(bfac, 50.0)
    # The target's structure is not modified (it still holds the true coordinates).
    assert np.array_equal(crambin.input.structure.atoms, before)


def test_write_structure_refuses_a_crop(crambin, crambin_features, tmp_path):
    with pytest.raises(ValueError, match="write_features"):
        write_structure(crambin.input.structure, crambin_features["coords"][0], crambin_features["atom_pad_mask"],
                        tmp_path / "crop.cif")
    with pytest.raises(ValueError, match="fmt"):
        write_features(crambin_features, crambin_features["coords"][0], tmp_path / "crop.xyz", fmt="xyz")


def test_chain_names():
    assert [chain_name(i) for i in (0, 25, 26, 61)] == ["A", "Z", "a", "9"]
    assert len(chain_name(62)) == 2 and chain_name(62) != chain_name(63)
